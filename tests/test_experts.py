"""Compression that sees experts (issue 17): RTN and GPTQ per expert, packed banks, expert pruning.

Tiny configs of each mixture-of-experts family are built in code (test_families.build); the
acceptance figures come from a tiny Mixtral trained here for a few hundred steps on the shared
TinyStories text, so its weights are not random.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from test_families import MOE, build

from conftest import TINYSTORIES, calibration, error_message, needs_assets, tiny_tokenizer
from frugalm.errors import ModelError, TechniqueError
from frugalm.export import export_compressed_tensors
from frugalm.measure import compute, moe
from frugalm.models import load_model, save_variant
from frugalm.registry import get_technique
from frugalm.runtime import cpu_kernels
from frugalm.runtime.experts import BANK_WEIGHTS, QuantExperts, expert_banks
from frugalm.runtime.modules import kernel_summary
from frugalm.runtime.quant_linear import quantize_groups
from frugalm.techniques.base import Context

IDS = torch.randint(4, 290, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {arch: build(arch, root / arch) for arch in MOE}


def apply(model, technique: str, calib=None, **options):
    t = get_technique(technique)
    ctx = Context(calibration=calibration(n=16) if calib is None else calib)
    model = t.apply(model, t.config_cls(**options), ctx)
    return model, ctx.changes[-1]


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def saved_and_loaded(model, tokenizer, folder: Path, **load):
    save_variant(model, tokenizer, folder, {})
    return load_model(folder, **load).model


# --- quantization per expert ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("technique", ["rtn_quant", "gptq_quant"])
def test_every_expert_is_quantized_packed_and_reloads_identically(arch, technique, moe_models, tmp_path):
    lm = load_model(moe_models[arch])
    reference = logits(lm.model)
    model, change = apply(lm.model, technique, bits=4, group_size=32)
    banks = [n for n, _, _ in expert_banks(model)]
    assert len(banks) == 2 and all(isinstance(model.get_submodule(n), QuantExperts) for n in banks)
    assert change["expert_banks"] == banks and set(banks) <= set(change["layers"])
    assert change["weight_bytes_ratio"] < 0.16  # int4: half a byte per weight plus scales
    assert kernel_summary(model).get("dense", 0) <= 2  # the routers' and heads' dense layers at most
    quantized = logits(model)
    assert (quantized - reference).abs().max() < 0.2 * reference.abs().max()
    reloaded = saved_and_loaded(model, lm.tokenizer, tmp_path / "v", fast_kernels=False)
    assert torch.equal(logits(reloaded), quantized)
    assert moe.active_params(reloaded)[0] == moe.active_params(load_model(moe_models[arch]).model)[0]


def test_a_packed_bank_computes_what_its_dequantized_float_bank_computes(moe_models):
    model = load_model(moe_models["mixtral"]).model
    model.set_experts_implementation("eager")
    name, bank, _ = expert_banks(model)[0]
    float_bank = copy.deepcopy(bank)
    packed, _ = apply(model, "rtn_quant", bits=8, targets=(name,))
    packed_bank = packed.get_submodule(name)
    for w in BANK_WEIGHTS:
        getattr(float_bank, w).data = torch.stack([packed_bank.dequantized(w, e) for e in range(bank.num_experts)])
    hidden = torch.randn(10, 64)
    index = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]] * 2 + [[3, 0], [1, 2]])
    weights = torch.rand(10, 2)
    assert torch.allclose(packed_bank(hidden, index, weights), float_bank(hidden, index, weights), atol=1e-6)


def test_packed_experts_count_the_flops_of_the_routed_experts(moe_models):
    model = load_model(moe_models["mixtral"]).model
    model.set_experts_implementation("eager")
    plain = compute.count_flops(lambda: model(IDS[:1]))
    packed, _ = apply(model, "rtn_quant", bits=8, targets=("*.experts",))
    assert compute.count_flops(lambda: packed(IDS[:1])) == plain


def test_rtn_experts_use_the_codes_of_round_to_nearest(moe_models):
    model = load_model(moe_models["olmoe"]).model
    name, bank, _ = expert_banks(model)[0]
    w = bank.down_proj[2].detach().clone()
    packed, _ = apply(model, "rtn_quant", bits=4, group_size=32, targets=("*.experts",))
    q, scale, zero = quantize_groups(w, 4, 32, True)
    got = packed.get_submodule(name)
    assert torch.equal(got.down_proj_scales[2], scale) and torch.equal(got.down_proj_zeros[2], zero)
    assert torch.equal(got.dequantized("down_proj", 2), (q.float().reshape(64, 2, 32) - zero[..., None].float()).mul(scale[..., None].float()).reshape(64, 64))  # fmt: skip


def test_gptq_experts_sent_too_few_tokens_get_round_to_nearest_and_are_reported(moe_models):
    rtn, _ = apply(load_model(moe_models["mixtral"]).model, "rtn_quant", bits=4, group_size=32, targets=("*.experts",))
    gptq, change = apply(load_model(moe_models["mixtral"]).model, "gptq_quant", bits=4, group_size=32,
                         observer="minmax", targets=("*.experts",), min_expert_tokens=10**6)  # fmt: skip
    counts = change["calibration_tokens_per_expert"]
    assert set(counts) == set(change["expert_banks"])
    # each of 16 x 32 calibration tokens goes to top_k = 2 experts of each block
    assert all(sum(c.values()) == 16 * 32 * 2 for c in counts.values())
    assert change["experts_round_to_nearest"] == counts  # every expert fell back, with its count
    for name in change["expert_banks"]:
        for key, buf in rtn.get_submodule(name).named_buffers():
            assert torch.equal(buf, gptq.get_submodule(name).get_buffer(key)), key
    _, change = apply(load_model(moe_models["mixtral"]).model, "gptq_quant", bits=4, targets=("*.experts",),
                      min_expert_tokens=0)  # fmt: skip
    assert change["experts_round_to_nearest"] == {}


def test_attention_and_experts_quantize_together_and_either_alone(moe_models):
    _, both = apply(load_model(moe_models["qwen2_moe"]).model, "rtn_quant", bits=8)
    assert any("self_attn" in n for n in both["layers"]) and both["expert_banks"]
    assert any("shared_expert" in n for n in both["layers"])  # Qwen2-MoE's shared expert is plain Linear layers
    _, experts = apply(load_model(moe_models["qwen2_moe"]).model, "rtn_quant", bits=8, targets=("*.mlp.experts",))
    assert experts["layers"] == experts["expert_banks"]
    _, attention = apply(load_model(moe_models["qwen2_moe"]).model, "rtn_quant", bits=8, targets=("*.self_attn.*",))
    assert "expert_banks" not in attention


REFUSED = [
    ("awq_quant", {}, ("mixture-of-experts", "experts", "rtn_quant or gptq_quant")),
    ("rtn_quant", {"activations": "dynamic-int8"}, ("weight-only", "activations none")),
    (
        "rtn_quant",
        {"group_size": 48, "indivisible": "error", "targets": ("*.experts",)},
        ("does not divide", "experts.gate_up_proj"),
    ),
    ("expert_prune", {"fraction": 0.8}, ("at least 2", "keeps 1")),
    ("expert_prune", {"fraction": 0.1}, ("removes none",)),
]


@pytest.mark.parametrize(("technique", "options", "words"), REFUSED)
def test_what_cannot_be_done_to_experts_is_refused_in_one_line(technique, options, words, moe_models):
    with pytest.raises(TechniqueError) as exc:
        apply(load_model(moe_models["mixtral"]).model, technique, **options)
    message = error_message(exc)
    assert message.startswith(technique) and all(w in message for w in words), message


def test_expert_pruning_refuses_a_dense_model(tiny_llama):
    with pytest.raises(TechniqueError) as exc:
        apply(load_model(tiny_llama).model, "expert_prune")
    assert "no experts to prune" in error_message(exc) and "llama" in error_message(exc)


def test_packed_experts_are_not_exported_as_compressed_tensors(moe_models, tmp_path):
    lm = load_model(moe_models["mixtral"])
    model, _ = apply(lm.model, "rtn_quant", bits=8)
    save_variant(model, lm.tokenizer, tmp_path / "v", {})
    with pytest.raises(ModelError) as exc:
        export_compressed_tensors(tmp_path / "v", tmp_path / "out")
    assert "packed experts" in error_message(exc) and not (tmp_path / "out").exists()


# --- expert pruning ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE)
def test_expert_pruning_removes_the_least_salient_expert_of_every_block_and_reloads_identically(arch, moe_models,
                                                                                                  tmp_path):  # fmt: skip
    lm = load_model(moe_models[arch])
    model = lm.model
    for _, bank, _ in expert_banks(model):
        bank.down_proj.data[2] = 0  # expert 2 adds nothing: REAP saliency 0
    before = sum(p.numel() for p in model.parameters())
    pruned, change = apply(model, "expert_prune", fraction=0.25)
    assert change["experts_before"] == 4 and change["experts_after"] == 3
    assert all(b["removed"] == [2] and b["saliency"][2] == 0 for b in change["banks"].values())
    assert sum(p.numel() for p in pruned.parameters()) == before - change["params_removed"]
    assert all(bank.num_experts == 3 for _, bank, _ in expert_banks(pruned))
    reloaded = saved_and_loaded(pruned, lm.tokenizer, tmp_path / "v")
    assert reloaded.config.get_text_config().num_experts_per_tok == 2
    assert torch.equal(logits(reloaded), logits(pruned))


def test_frequency_pruning_removes_each_blocks_least_routed_expert(moe_models):
    _, change = apply(load_model(moe_models["mixtral"]).model, "expert_prune", fraction=0.25, criterion="frequency")
    for name, bank in change["banks"].items():
        tokens = bank["calibration_tokens"]
        assert bank["saliency"] == [float(t) for t in tokens]
        assert bank["removed"] == [sorted(range(4), key=lambda e: (-tokens[e], e))[-1]]  # ties: the lower index stays


def test_packed_banks_can_be_pruned(moe_models, tmp_path):
    lm = load_model(moe_models["olmoe"])
    model, _ = apply(lm.model, "rtn_quant", bits=4, group_size=32)
    pruned, change = apply(model, "expert_prune")
    assert all(isinstance(b, QuantExperts) and b.num_experts == 3 for _, b, _ in expert_banks(pruned))
    reloaded = saved_and_loaded(pruned, lm.tokenizer, tmp_path / "v", fast_kernels=False)
    assert torch.equal(logits(reloaded), logits(pruned))


# --- acceptance: a tiny Mixtral trained on real text ---------------------------------------------

TRAIN_STEPS, WINDOW, BATCH = 400, 64, 16


@pytest.fixture(scope="module")
def trained_mixtral(tmp_path_factory):
    """A 2-block, 4-expert (top 2) Mixtral trained TRAIN_STEPS steps on TinyStories; its held-out windows; calibration windows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    needs_assets()
    tok = tiny_tokenizer()
    ids = torch.tensor(tok(TINYSTORIES.read_text()[:400_000])["input_ids"])
    cut = int(len(ids) * 0.9)
    train, held = ids[:cut], ids[cut:]
    config = AutoConfig.for_model("mixtral", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_hidden_layers=2,
                                  hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, intermediate_size=128, num_local_experts=4,
                                  num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(train) - WINDOW, (BATCH,), generator=g).tolist()
        x = torch.stack([train[s : s + WINDOW] for s in starts])
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("trained") / "mixtral"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    starts = torch.randint(0, len(train) - WINDOW, (128,), generator=torch.Generator().manual_seed(1)).tolist()
    calib = torch.stack([train[s : s + WINDOW] for s in starts])
    return folder, held[: len(held) // WINDOW * WINDOW].reshape(-1, WINDOW), calib


@torch.no_grad()
def perplexity_and_kl(model, windows: torch.Tensor, reference=None) -> tuple[float, float]:
    """(perplexity, mean per-token KL(reference || model) in nats; 0 without a reference) over `windows`."""
    nll, kl = [], []
    for w in windows.split(64):
        out = model(w, labels=w)
        nll.append(out.loss.item())
        if reference is not None:
            p = torch.log_softmax(reference(w).logits, -1)
            kl.append(torch.nn.functional.kl_div(torch.log_softmax(out.logits, -1), p, log_target=True, reduction="none").sum(-1).mean().item())  # fmt: skip
    n = len(nll)  # equal-sized batches: the mean of means is the mean
    return math.exp(sum(nll) / n), sum(kl) / n if kl else 0.0


def test_gptq_per_expert_removes_most_of_rtn_int4_damage_and_pruning_states_its_cost(trained_mixtral, tmp_path):
    folder, held, calib = trained_mixtral
    reference = load_model(folder).model
    base, _ = perplexity_and_kl(reference, held)
    ppl, kl = {}, {}
    for technique in ("rtn_quant", "gptq_quant"):
        model, _ = apply(load_model(folder).model, technique, calib, bits=4, group_size=32, targets=("*.mlp.experts",))
        ppl[technique], kl[technique] = perplexity_and_kl(model, held, reference)
    removed = 1 - (ppl["gptq_quant"] - base) / (ppl["rtn_quant"] - base)
    kl_removed = 1 - kl["gptq_quant"] / kl["rtn_quant"]
    print(f"\nfloat ppl {base:.4f}; experts int4 g32: RTN {ppl['rtn_quant']:.4f}, GPTQ {ppl['gptq_quant']:.4f}: "
          f"GPTQ removes {removed:.0%} of RTN's perplexity increase; KL to float {kl['rtn_quant']:.2e} vs "
          f"{kl['gptq_quant']:.2e} nats/token ({kl_removed:.0%} removed)")  # fmt: skip
    # The perplexity increase is ~0.4% here: its size moves with the seed (its first-order part has
    # either sign), so the KL to the float model, second order and never negative, is checked too:
    # GPTQ halves it (47% removed at this seed; per expert weight, the output error on the routed
    # tokens falls 4-15x, the rest is routing downstream that both variants change).
    assert ppl["rtn_quant"] > base and removed >= 0.5 and kl_removed >= 0.3

    lm = load_model(folder)
    pruned, change = apply(lm.model, "expert_prune", calib, fraction=0.25)
    cost = perplexity_and_kl(pruned, held)[0] / base - 1
    print(f"expert pruning 25% (REAP): removed {change['params_removed']} params; perplexity {cost:+.1%}")
    assert change["experts_after"] == 3 and 0 < cost < 1
    reloaded = saved_and_loaded(pruned, lm.tokenizer, tmp_path / "pruned")
    assert torch.equal(logits(reloaded, held[:4]), logits(pruned, held[:4]))


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_experts_load_onto_the_cpu_kernels_and_count_alike(bits, moe_models, tmp_path):
    from frugalm.measure.memory import params_count
    from frugalm.runtime.experts import FastExperts

    lm = load_model(moe_models["mixtral"])
    model, _ = apply(lm.model, "rtn_quant", bits=bits, group_size=32 if bits == 4 else -1)
    folder = save_variant(model, lm.tokenizer, tmp_path / "v", {})
    fast, slow = load_model(folder).model, load_model(folder, fast_kernels=False).model
    assert all(isinstance(b, FastExperts) for _, b, _ in expert_banks(fast))
    decode = "frugalm-int8-rows" if bits == 8 and cpu_kernels.available() else f"int{bits}pack"
    kernel = f"{decode}-bf16 decode, bf16-dequantize prefill, fused loop in compiled decode"  # small layers
    assert kernel_summary(fast) == {kernel: 8 + 2 * 4 * 2, "dense": 1}  # attention, 2 x 4 experts x 2 weights; head
    assert kernel_summary(slow) == {"dequantize": 8 + 2, "dense": 1}
    a, b = logits(fast), logits(slow)
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()  # bfloat16 activations on the kernels
    for ids in (IDS[:1, :1], IDS[:1]):  # a decode step, a prefill
        assert compute.count_flops(lambda i=ids: fast(i)) == compute.count_flops(lambda i=ids: slow(i))
    assert params_count(fast) == params_count(slow) and moe.active_params(fast)[0] == moe.active_params(slow)[0]
    with pytest.raises(AssertionError, match="before swapping in fast kernels"):
        save_variant(fast, lm.tokenizer, tmp_path / "again", {})
