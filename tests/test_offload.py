"""The offload stage: part of the blocks on disk, outputs unchanged, reads counted, bad input refused."""

import pytest
import torch

from frugalm.errors import TechniqueError
from frugalm.measure.memory import weights_bytes
from frugalm.models import load_model, save_variant
from frugalm.recipe import build_config
from frugalm.registry import get_technique
from frugalm.runtime import decoding, offload
from frugalm.techniques.base import Context


def _offloaded(folder, tmp_path, frac):
    lm = load_model(folder, fast_kernels=False)
    technique = get_technique("offload")
    config, problems = build_config(technique.config_cls, {"max_memory_frac": frac}, "offload")
    assert problems == []
    ctx = Context()
    model = technique.apply(lm.model, config, ctx)
    return save_variant(model, lm.tokenizer, tmp_path / "off", {"changes": ctx.changes}), ctx.changes[-1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_offloaded_variant_decodes_the_same_and_reads_its_blocks(arch, tiny_models, tmp_path):
    dense = load_model(tiny_models[arch])
    folder, change = _offloaded(tiny_models[arch], tmp_path, 0.8)
    plan = change["plan"]
    assert plan["blocks_on_disk"] >= 1 and plan["resident_bytes"] <= plan["budget_bytes"]
    lm = load_model(folder)
    assert offload.plan_of(lm.model) is not None
    assert weights_bytes(lm.model) == plan["resident_bytes"] < weights_bytes(dense.model)
    ids = torch.randint(3, 290, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, dense.model(ids).logits, rtol=0, atol=0)
    plain = decoding.generate(dense.model, ids, 12)
    before = offload.bytes_read(lm.model)
    assert decoding.generate(lm.model, ids, 12) == plain
    assert (
        offload.bytes_read(lm.model) - before == 12 * plan["offloaded_bytes"]
    )  # every forward reads every offloaded byte
    assert offload.evict(folder) > 0
    assert decoding.generate(lm.model, ids, 12) == plain  # cold: read from the disk, same output


def test_offload_refuses_what_it_cannot_do(tiny_models, tmp_path):
    technique = get_technique("offload")
    _, problems = build_config(technique.config_cls, {"max_memory_frac": 1.5}, "offload")
    assert "max_memory_frac must be in (0, 1)" in problems[0]
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    with pytest.raises(TechniqueError, match="embeddings, head, norms"):
        technique.apply(lm.model, technique.config_cls(max_memory_frac=0.05), Context())
    quantized = get_technique("rtn_quant").apply(lm.model, get_technique("rtn_quant").config_cls(), Context())
    with pytest.raises(TechniqueError, match="packed quantized layers"):
        technique.apply(quantized, technique.config_cls(), Context())


def test_offloaded_variant_is_measured(tiny_models, text_file, tmp_path, capsys):
    """frugalm run: resident weights, bytes read per step and the cold step are stored; outputs match the original."""
    import json

    from frugalm.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: offloaded\nstages:\n  - technique: offload\n    max_memory_frac: 0.8\n")
    metrics = [
        "weights_mib",
        "offload_read_mib_per_tok",
        "tpot_cold_ms",
        "tpot_p50_ms",
        "kl_ref_nats",
        "top1_agree_frac",
    ]
    args = ["run", str(recipe), str(tiny_models["llama"]), "--data", str(text_file), "--out", str(tmp_path / "v"),
            "--store", str(tmp_path / "s.db"), "--workload", "chat", "--repetitions", "1", "--speedup", "no",
            "--json", "--quiet", *[a for m in metrics for a in ("--metric", m)]]  # fmt: skip
    assert main(args) == 0
    figures = {(m["metric"], m["workload"]): m for m in json.loads(capsys.readouterr().out)["metrics"]}
    plan = figures[("weights_mib", None)]["protocol"]["offload"]
    assert figures[("weights_mib", None)]["value"] * 2**20 == plan["resident_bytes"]
    assert figures[("offload_read_mib_per_tok", "chat")]["value"] * 2**20 == plan["offloaded_bytes"]
    assert figures[("tpot_cold_ms", "chat")]["value"] > 0
    assert figures[("kl_ref_nats", None)]["value"] == 0 and figures[("top1_agree_frac", None)]["value"] == 1
