"""Export to compressed-tensors: transformers loads the checkpoint and computes the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    STORIES,
    TINYSTORIES,
    calibration,
    error_message,
    logits,
    needs_assets,
    run,
)
from frugalm.errors import ModelError
from frugalm.export import export_compressed_tensors
from frugalm.models import load_model, save_variant

CASES = {
    "int8-channel": dict(bits=8, group_size=-1, symmetric=True),
    "int8-channel-asym": dict(bits=8, group_size=-1, symmetric=False),
    "int4-group32": dict(bits=4, group_size=32, symmetric=True),
    "int4-channel": dict(bits=4, group_size=-1, symmetric=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_export_with_frugalms_logits(tiny_models, tmp_path, case):
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    run("rtn_quant", lm.model, **CASES[case])
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    out = export_compressed_tensors(artifact, tmp_path / "ct")

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["format"] == ("int-quantized" if CASES[case]["bits"] == 8 else "pack-quantized")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calibration(2, 24, seed=4)
    ours = logits(load_model(artifact, fast_kernels=False).model, ids)
    theirs = logits(loaded, ids)
    # The same codes and scales; only the order of float operations in dequantization differs.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_export_is_no_larger_than_frugalms_artifact(tiny_models, tmp_path):
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    run("rtn_quant", lm.model, bits=4, group_size=32)
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    out = export_compressed_tensors(artifact, tmp_path / "ct")
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(out) <= size(artifact) * 1.05  # int32 packing, same codes; the scales' dtype is float16 in both


def test_gptq_int4_with_act_order_exports(tiny_models, tmp_path):
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    run("gptq_quant", lm.model, bits=4, group_size=32, act_order=True)
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    out = export_compressed_tensors(artifact, tmp_path / "ct")
    ids = calibration(2, 24, seed=5)
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids),
        logits(load_model(artifact, fast_kernels=False).model, ids),
        rtol=1e-5,
        atol=1e-5,
    )


def test_refuses_asymmetric_int4_which_transformers_cannot_load(tiny_models, tmp_path):
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    run("rtn_quant", lm.model, bits=4, group_size=32, symmetric=False)
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    with pytest.raises(ModelError) as exc:
        export_compressed_tensors(artifact, tmp_path / "ct")
    assert "symmetric: true" in error_message(exc)
    assert not (tmp_path / "ct").exists()


def test_refuses_a_variant_without_quantized_layers(tiny_llama, tmp_path):
    with pytest.raises(ModelError) as exc:
        export_compressed_tensors(tiny_llama, tmp_path / "ct")
    assert "no quantized layers" in error_message(exc)
    assert not (tmp_path / "ct").exists()


def test_refuses_conv1d_layers_which_the_format_cannot_describe(tiny_models, tmp_path):
    lm = load_model(tiny_models["gpt2"], fast_kernels=False)
    run("rtn_quant", lm.model, bits=8)
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    with pytest.raises(ModelError) as exc:
        export_compressed_tensors(artifact, tmp_path / "ct")
    assert "Conv1D, not nn.Linear" in error_message(exc)
    assert not (tmp_path / "ct").exists()


def test_refuses_w8a8_dynamic_and_names_the_exportable_format(tiny_llama, tmp_path):
    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=8, activations="dynamic-int8")
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    with pytest.raises(ModelError) as exc:
        export_compressed_tensors(artifact, tmp_path / "ct")
    message = error_message(exc)
    assert "w8a8-dynamic" in message and "activations: none" in message and "w8a16" in message
    assert not (tmp_path / "ct").exists()


def test_an_artifact_saved_before_formats_were_recorded_loads_as_it_was_measured(tiny_llama, tmp_path):
    """Old int8 artifacts have no inference.linear_formats: they were measured on fbgemm, so they are w8a8-dynamic."""
    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=8)
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    meta = json.loads((artifact / "frugalm.json").read_text())
    del meta["inference"]["linear_formats"]
    (artifact / "frugalm.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as exc:
        export_compressed_tensors(artifact, tmp_path / "ct")
    assert "w8a8-dynamic" in error_message(exc)


@pytest.mark.integration
@needs_assets()
def test_the_w8a16_export_has_the_stored_perplexity_under_plain_transformers(tmp_path):
    """The figure frugalm stores for a w8a16 variant is the figure of the checkpoint a user ships."""
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.quality import PerplexityProtocol, measure_quality
    from frugalm.models import context_length
    from frugalm.recipe import parse_recipe
    from frugalm.run import RunConfig, run_recipe
    from frugalm.text.files import read_text, split_documents

    recipe, problems = parse_recipe(
        {"version": 1, "name": "w8a16", "stages": [{"technique": "rtn_quant", "bits": 8, "activations": "none"}]}
    )
    assert not problems
    protocol = PerplexityProtocol(max_tokens=8192)
    bench_config = BenchConfig(data=str(TINYSTORIES), workloads=(), metrics=("ppl_tok",), protocol=protocol)
    result = run_recipe(
        recipe, str(STORIES), RunConfig(out_dir=str(tmp_path / "variant"), bench=bench_config), store=tmp_path / "s.db"
    )
    stored = {m.metric: m for m in result.bench.measurements}["ppl_tok"]
    assert result.metadata["changes"][0]["format"] == "w8a16"

    out = export_compressed_tensors(result.artifact, tmp_path / "ct")
    shipped = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = load_model(out).tokenizer
    docs = split_documents(read_text(TINYSTORIES))
    figures = measure_quality(shipped, tokenizer, docs, protocol, context=context_length(shipped.config), data_desc={})
    exported = {m.metric: m for m in figures}["ppl_tok"]
    assert (
        exported.protocol["window"] == stored.protocol["window"]
        and exported.protocol["stride"] == stored.protocol["stride"]
    )
    assert exported.value == pytest.approx(stored.value, rel=1e-4), (exported.value, stored.value)
