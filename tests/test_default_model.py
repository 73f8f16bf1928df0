"""The shipped default model, its build, and the training loop it is trained with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from frugalm.assets import DEFAULT_EVAL_PATH, DEFAULT_MODEL_DIR  # noqa: E402
from frugalm.errors import ConfigError, DataError  # noqa: E402
from frugalm.text.files import read_text, split_documents  # noqa: E402
from frugalm.training.loop import TrainConfig, lr_at, train_causal_lm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the build script is no package module
import build_default_model as dm  # noqa: E402

BUILD_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "frugalm_build.json",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are small enough that per-op overhead dominates, and on a small shared
    # machine a second, contended OpenMP thread multiplies it; one thread keeps timings steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped():
    folder = DEFAULT_MODEL_DIR
    record = json.loads((folder / "frugalm_build.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, record


def test_shipped_model_loads_with_recorded_shape(shipped):
    model, tokenizer, record = shipped
    assert isinstance(model, LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert {key: getattr(model.config, key) for key in record["model_shape"]} == record["model_shape"]
    assert model.config.max_position_embeddings == dm.CONTEXT and model.config.tie_word_embeddings
    assert len(tokenizer) == model.config.vocab_size == record["vocab_size"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "</s>")
    assert tokenizer("x = 1").input_ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert set(p.name for p in DEFAULT_MODEL_DIR.iterdir()) == BUILD_FILES
    assert size <= 12 * 2**20


def test_shipped_eval_text_matches_build_record(shipped):
    _, _, record = shipped
    raw = DEFAULT_EVAL_PATH.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == record["eval_text_sha256"]
    assert 250_000 <= len(raw) <= 400_000
    assert len(split_documents(read_text(DEFAULT_EVAL_PATH))) == record["eval_documents"]


def test_eval_text_is_exactly_the_held_out_split_of_this_python(shipped):
    if platform.python_version() != shipped[2]["python_version"]:
        pytest.skip("the corpus is this Python's standard library; the shipped build used another version")
    docs = dm.stdlib_documents()
    held_out = [d for d in docs if dm.is_held_out(d[0])]
    expected = dm.format_eval_text(text for _, text in dm.eval_documents(held_out))
    assert DEFAULT_EVAL_PATH.read_text(encoding="utf-8") == expected
    assert len(held_out) < len(docs) / 10


def test_shipped_model_beats_unigram_on_held_out_text(shipped):
    model, tokenizer, _ = shipped
    docs = split_documents(read_text(DEFAULT_EVAL_PATH))
    # A prefix of about 12k tokens keeps the test fast: whole documents, the last one cut.
    ids, total = [], 0
    for doc_ids in dm.encode_documents(tokenizer, docs):
        ids.append(doc_ids[: 12_000 - total])
        total += len(ids[-1])
        if total >= 12_000:
            break
    ppl = dm.heldout_perplexity(model, ids, tokenizer.bos_token_id)
    # The unigram is fitted on the scored tokens themselves: an optimistic baseline to beat.
    unigram = dm.unigram_perplexity(ids, ids, len(tokenizer))
    assert ppl < unigram / 3, (ppl, unigram)


def test_unigram_perplexity_matches_hand_computation():
    # counts {0: 2, 1: 1, 2: 0}; add-one: p = (3/6, 2/6, 1/6)
    ppl = dm.unigram_perplexity([[0, 0, 1]], [[0, 2]], vocab_size=3)
    assert ppl == pytest.approx((1 / 2 * 1 / 6) ** -0.5)


def test_eval_text_splits_back_into_its_documents():
    docs = ["a = 1\n", "no newline", "\nx\n\ny\n"]
    text = dm.format_eval_text(docs)
    assert text.count("\n<|endoftext|>\n") == 2
    assert split_documents(text) == [d.strip() for d in docs]  # the benchmark's reader strips


def test_tiny_build_is_complete_and_loadable(tmp_path):
    out = tmp_path / "model"
    record = dm.build_default_model(out, steps=1, corpus_limit=60)
    assert {p.name for p in out.iterdir()} == BUILD_FILES
    assert json.loads((out / "frugalm_build.json").read_text()) == record
    assert record["eval_documents"] > 0 and record["train_tokens_seen"] == 1 * 2 * dm.CONTEXT
    assert (tmp_path / "default_eval.txt").stat().st_size == record["eval_text_bytes"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    out_ids = model.generate(**tokenizer("import os\n", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] == len(tokenizer("import os\n").input_ids) + 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class Interrupted(BaseException):
    """Stands in for Ctrl-C: not an Exception, so only a BaseException handler sees it."""


def test_interrupted_build_leaves_nothing_at_the_final_path(tmp_path, monkeypatch):
    def interrupt(folder, record):
        assert (folder / "model.safetensors").exists()  # the model is complete, just not renamed
        raise Interrupted

    monkeypatch.setattr(dm, "write_build_record", interrupt)
    with pytest.raises(Interrupted):
        dm.build_default_model(tmp_path / "model", steps=1, corpus_limit=60)
    assert list(tmp_path.iterdir()) == []  # no model folder, no eval text, no temporary folder


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )


def _pattern_tokens() -> torch.Tensor:
    # A learnable stream: a fixed random permutation of 0..31, repeated; shape (3200,).
    return torch.randperm(32, generator=torch.Generator().manual_seed(1)).repeat(100)


TINY = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=5, log_every=5)


def test_training_is_deterministic_and_learns():
    a, b = _tiny_model(), _tiny_model()
    result = train_causal_lm(a, _pattern_tokens(), TINY)
    train_causal_lm(b, _pattern_tokens(), TINY)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert [step for step, _ in result.losses] == [5, 10, 15, 20, 25, 30]
    assert result.losses[-1][1] < 0.5 * result.losses[0][1]
    assert result.tokens_seen == 30 * 4 * 32

    c = _tiny_model()
    train_causal_lm(c, _pattern_tokens(), dataclasses.replace(TINY, seed=1))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_learning_rate_schedule():
    config = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(109, config) == pytest.approx(0.1)
    assert lr_at(60, config) < lr_at(40, config)


def test_bad_training_inputs_raise_frugalm_errors():
    with pytest.raises(ConfigError, match="steps=0.*lr=0"):
        train_causal_lm(_tiny_model(), _pattern_tokens(), TrainConfig(steps=0, lr=0))
    with pytest.raises(DataError, match="seq_len"):
        train_causal_lm(_tiny_model(), torch.arange(10), TINY)
