import pytest
import torch

from conftest import TINY_CONFIGS
from frugalm.errors import ConfigError, ModelError
from frugalm.models import context_length, load_model, resolve_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_each_architecture_loads_and_runs(tiny_models, arch):
    lm = load_model(tiny_models[arch])
    assert type(lm.model).__name__.lower().startswith(arch.replace("_", ""))
    ids = lm.tokenizer("a little model", return_tensors="pt").input_ids
    logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], lm.model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert context_length(lm.model.config) == 256


def test_gpt2_linears_are_conv1d(tiny_models):
    # GPT-2 stores its projections as transformers' Conv1D (weight (in, out)), not nn.Linear:
    # techniques that select "linear" layers must handle both.
    from transformers.pytorch_utils import Conv1D

    lm = load_model(tiny_models["gpt2"])
    assert isinstance(lm.model.transformer.h[0].attn.c_attn, Conv1D)


def test_dtype_is_applied(tiny_llama):
    lm = load_model(tiny_llama, dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model folder.*config.json"):
        resolve_model(tmp_path)


def test_config_without_weights(tmp_path, tiny_llama):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        resolve_model(tmp_path)


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(ModelError) as info:
        resolve_model("frugalm-test/does-not-exist-anywhere")
    message = str(info.value)
    assert "\n" not in message and "local-dir" in message


def test_unknown_dtype_and_device(tiny_llama):
    with pytest.raises(ConfigError, match="unknown dtype 'float33'.*float32"):
        load_model(tiny_llama, dtype="float33")
    with pytest.raises(ConfigError, match="unknown device"):
        load_model(tiny_llama, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_says_so(tiny_llama):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_model(tiny_llama, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_loads_on_cuda(tiny_llama):
    lm = load_model(tiny_llama, device="cuda", dtype="bfloat16")
    assert next(lm.model.parameters()).is_cuda
