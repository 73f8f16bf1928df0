"""Weight-only quantization: RTN, GPTQ and AWQ into packed QuantLinear storage."""

from __future__ import annotations

import copy
import math
import platform

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import (
    STORIES,
    TINY_CONFIGS,
    TINYSTORIES,
    VOCAB,
    calibration,
    error_message,
    load,
    logits,
    needs_assets,
    run,
)
from frugalm.errors import TechniqueError
from frugalm.recipe import parse_recipe
from frugalm.registry import get_technique
from frugalm.runtime import cpu_kernels
from frugalm.runtime.modules import inference_settings, is_linear, kernel_summary, weight_out_in
from frugalm.runtime.quant_linear import (
    Int8Linear,
    QuantLinear,
    dequantize_groups,
    has_fbgemm,
    quantize_groups,
    to_fast_kernels_,
)
from frugalm.techniques._arch import ARCHS as ARCH_TABLE
from frugalm.techniques._arch import DEFAULT_TARGETS, decoder_blocks
from frugalm.techniques._calibrate import calibrate_blocks, collect_input_stats
from frugalm.techniques.base import Context, select_linears
from frugalm.techniques.quant_awq import (
    clip_search,
    fake_quant,
    output_error,
    search_scale,
)
from frugalm.techniques.quant_gptq import gptq_codes, group_params
from frugalm.techniques.quant_rtn import stored_bytes

ARCHS = sorted(TINY_CONFIGS)
QUANT = ["rtn_quant", "gptq_quant", "awq_quant"]

INT8_DECODE = "frugalm-int8-rows" if cpu_kernels.available() else "int8pack"
"""The kernel w8a16 layers decode on: frugalm's where it builds (here), ATen's otherwise."""


def correlated_inputs(n=1024, width=128, seed=0, outliers=()):
    """Calibration-like inputs (n, width): correlated features of unequal scale, a few large channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) @ (torch.eye(width) + torch.randn(width, width, generator=g) / width**0.5)
    x = x * (0.5 + torch.rand(width, generator=g))
    for c in outliers:
        x[:, c] *= 20
    return x


# --- every technique, every architecture --------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("technique", QUANT)
def test_every_technique_quantizes_every_architecture(tiny_models, arch, technique):
    model = load(tiny_models[arch])
    ids = calibration(2, 16, seed=1)
    before = logits(model, ids)
    targeted = [n for n, _ in select_linears(model, DEFAULT_TARGETS)]
    change = run(technique, model, bits=4)
    after = logits(model, ids)
    assert torch.isfinite(after).all()
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in targeted)
    assert change["layers"] == targeted and change["bits"] == 4 and 0 < change["fraction_of_params"] < 1
    # 4-bit per-channel on a random tiny model: close to, not equal to, the float output
    assert 0 < (after - before).pow(2).mean() < 0.05 * before.pow(2).mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_architecture_table_finds_the_blocks_and_every_linear_in_them(tiny_models, arch):
    model = load(tiny_models[arch])
    name, blocks = decoder_blocks(model)
    assert name == ARCH_TABLE[arch].blocks and len(blocks) == model.config.num_hidden_layers
    inside = [n for n, m in model.named_modules() if is_linear(m) and n.startswith(name + ".")]
    assert [n for n, _ in select_linears(model, DEFAULT_TARGETS)] == inside  # OPT's fc1/fc2 included, the head not
    for technique in ("rtn_quant", "gptq_quant", "awq_quant", "magnitude_prune", "wanda_prune", "sparsegpt_prune"):
        assert get_technique(technique).config_cls().targets == DEFAULT_TARGETS, technique


X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@pytest.mark.parametrize("technique", QUANT)
def test_int8_is_nearly_lossless_and_w8a8_dynamic_runs_on_fbgemm(tiny_llama, technique):
    model = load(tiny_llama)
    ids = calibration(2, 16, seed=1)
    before = logits(model, ids)
    change = run(technique, model, bits=8, activations="dynamic-int8")
    assert change["format"] == "w8a8-dynamic"
    after = logits(model, ids)  # activations quantized as fbgemm does, on the dequantized weights
    assert (after - before).abs().max() < 0.02 * before.abs().max()
    swapped = to_fast_kernels_(model)
    if X86:  # fbgemm ships with every x86 build of torch: its absence is a broken install, not a skip
        assert has_fbgemm() and torch.backends.quantized.engine == "fbgemm"
        assert len(swapped) == 14 and all(isinstance(model.get_submodule(n), Int8Linear) for n in swapped)
    if swapped:
        # fbgemm and frugalm's emulation of it: same codes, same activation grid, float summation order apart
        assert (logits(model, ids) - after).abs().max() < 1e-3 * before.abs().max()


@pytest.mark.parametrize("technique", QUANT)
def test_w8a16_is_weight_only_and_never_runs_on_fbgemm(tiny_llama, technique):
    model = load(tiny_llama)
    change = run(technique, model, bits=8)  # activations: none is the default
    assert change["format"] == "w8a16"
    assert inference_settings(model)["linear_formats"] == {"w8a16": change["layers"]}
    to_fast_kernels_(model)  # weight-only: the int8 decode kernel (bfloat16 activations) where it applies, never fbgemm
    assert {getattr(m, "format", None) for m in model.modules() if getattr(m, "bits", None)} == {"w8a16"}
    assert "fbgemm" not in kernel_summary(model)


def test_w8a8_dynamic_emulation_matches_fbgemm_on_stories_scale_inputs():
    """The emulated activation grid (per tensor, asymmetric, codes 0..127) is fbgemm's own."""
    if not has_fbgemm():
        pytest.skip("no fbgemm on this CPU")
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    q, scale, zero = quantize_groups(dense.weight, 8, -1, True)
    layer = QuantLinear.from_codes(q, scale, zero, 8, dense.bias)
    layer.activations = "dynamic-int8"
    x = torch.randn(3, 20, 64) * 3
    torch.testing.assert_close(Int8Linear(layer)(x), layer(x), rtol=0, atol=2e-5)


def test_activation_quantization_needs_int8_per_channel_symmetric():
    for options, fragment in [
        ({"bits": 4}, "bits 8"),
        ({"bits": 8, "group_size": 32}, "group_size -1"),
        ({"bits": 8, "symmetric": False}, "symmetric"),
    ]:
        for technique in QUANT:
            _, problems = parse_recipe({"stages": [{"technique": technique, "activations": "dynamic-int8", **options}]})
            assert (
                len(problems) == 1
                and "dynamic-int8" in problems[0]
                and fragment in problems[0]
                and "w8a16" in problems[0]
            ), problems


@pytest.mark.parametrize("technique", QUANT)
def test_a_group_size_that_does_not_divide_a_layer_falls_back_to_per_channel(tiny_llama, technique):
    # tiny_llama: attention and gate/up take 64 columns, down_proj 128; group 128 divides only down_proj
    model = load(tiny_llama)
    change = run(technique, model, bits=4, group_size=128)  # the default: per channel where it does not divide
    fallback = set(change["per_channel_layers"])
    assert fallback and all(not n.endswith("down_proj") for n in fallback)
    for name in change["layers"]:
        groups = model.get_submodule(name).scales.shape[1]
        assert groups == 1, name  # 64 columns per channel, 128 columns in one group of 128
    assert change["group_size"] == 128


def test_load_model_runs_each_format_on_its_own_kernel(tiny_llama, tmp_path):
    from frugalm.models import load_model, read_metadata, save_variant
    from frugalm.runtime.modules import kernel_summary

    artifacts = {}
    for activations in ("none", "dynamic-int8"):
        lm = load_model(tiny_llama, fast_kernels=False)
        change = run("rtn_quant", lm.model, bits=8, activations=activations)
        artifacts[change["format"]] = save_variant(lm.model, lm.tokenizer, tmp_path / activations, {})
    meta = read_metadata(artifacts["w8a16"])
    assert (
        list(meta["inference"]["linear_formats"]) == ["w8a16"]
        and len(meta["inference"]["linear_formats"]["w8a16"]) == 14
    )
    assert list(read_metadata(artifacts["w8a8-dynamic"])["inference"]["linear_formats"]) == ["w8a8-dynamic"]
    assert kernel_summary(load_model(artifacts["w8a16"]).model) == {
        f"{INT8_DECODE}-bf16 decode, bf16-dequantize prefill, fused loop in compiled decode": 14,  # small layers
        "dense": 1,
    }  # never fbgemm
    fast = load_model(artifacts["w8a8-dynamic"]).model
    slow = load_model(artifacts["w8a8-dynamic"], fast_kernels=False).model
    assert {m.activations for m in slow.modules() if isinstance(m, QuantLinear)} == {"dynamic-int8"}
    if X86:
        assert kernel_summary(fast) == {"fbgemm": 14, "dense": 1}


# --- storage ------------------------------------------------------------------------------------


def test_int8_per_channel_stores_at_most_027x_float32(tiny_llama):
    model = load(tiny_llama)
    originals = {n: m.weight.numel() * 4 for n, m in select_linears(model, DEFAULT_TARGETS)}
    change = run("rtn_quant", model, bits=8)
    stored = sum(stored_bytes(model.get_submodule(n)) for n in originals)
    assert stored <= 0.27 * sum(originals.values())
    assert change["weight_bytes_ratio"] == pytest.approx(stored / sum(originals.values()))


def test_int4_group128_stores_at_most_0145x_float32():
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.proj = nn.Linear(1536, 576)
    change = run("rtn_quant", model, bits=4, group_size=128, targets=("mlp.proj",))
    q = model.mlp.proj
    assert isinstance(q, QuantLinear) and q.qweight.shape == (576, 768) and q.scales.shape == (576, 12)
    assert stored_bytes(q) <= 0.145 * 1536 * 576 * 4
    assert change["weight_bytes_ratio"] <= 0.145


def test_gpt2_conv1d_is_quantized_in_out_in_orientation(tiny_models):
    model = load(tiny_models["gpt2"])
    conv = model.transformer.h[0].attn.c_attn  # Conv1D, weight (in, out)
    expected = dequantize_groups(*quantize_groups(weight_out_in(conv), 8, -1, True))
    run("rtn_quant", model, bits=8, targets=("*.h.0.attn.c_attn",))
    assert torch.equal(model.transformer.h[0].attn.c_attn.dequantized_weight(), expected)


@pytest.mark.parametrize("technique", QUANT)
def test_state_dict_reloads_into_a_skeleton_exactly(tiny_llama, technique):
    model = load(tiny_llama)
    run(technique, model, bits=4, group_size=32)
    ids = calibration(2, 16, seed=1)
    expected = logits(model, ids)
    skeleton = load(tiny_llama)  # fresh float model: norms are overwritten too (AWQ folds into them)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(
                skeleton.get_submodule(parent),
                child,
                QuantLinear(m.in_features, m.out_features, m.bits, m.group_size, m.bias is not None),
            )
    skeleton.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(skeleton, ids), expected)


def test_awq_variant_saves_and_loads_as_an_artifact(tiny_llama, tmp_path):
    from frugalm.models import load_model, save_variant

    lm = load_model(tiny_llama, fast_kernels=False)
    run("awq_quant", lm.model, bits=4)
    ids = calibration(2, 16, seed=1)
    expected = logits(lm.model, ids)
    again = load_model(save_variant(lm.model, lm.tokenizer, tmp_path / "v", {}), fast_kernels=False)
    assert torch.equal(logits(again.model, ids), expected)


# --- GPTQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_layer_error_is_below_rtn(group_size, act_order, symmetric):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.double().t() @ x.double() / len(x)
    rtn = output_error(w - fake_quant(w, 4, group_size, symmetric), x.t() @ x / len(x))
    for observer in ("minmax", "mse"):
        q, scale, zero = gptq_codes(
            w, h, bits=4, group_size=group_size, symmetric=symmetric, act_order=act_order, observer=observer
        )
        assert q.dtype == torch.uint8 and scale.shape == zero.shape == (64, 128 // (32 if group_size > 0 else 128))
        gptq = output_error(w - dequantize_groups(q, scale, zero), x.t() @ x / len(x))
        assert gptq < 0.8 * rtn, (observer, gptq, rtn)


def test_gptq_with_act_order_keeps_groups_in_the_original_column_order():
    # static groups: group k's scale covers original columns [32k, 32k + 32), whatever the order
    x = correlated_inputs()
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    w[:, :32] *= 100  # group 0 is much wider than the others
    h = 2 * x.double().t() @ x.double() / len(x)
    _, scale, _ = gptq_codes(w, h, bits=4, group_size=32, symmetric=True, act_order=True)
    assert (scale[:, 0].float() > 20 * scale[:, 1:].float().amax(1)).all()


def test_mse_observer_params_match_quantize_groups_at_full_range():
    w = torch.randn(32, 64)
    w[3] = 0  # an all-zero row stays representable
    for symmetric in (True, False):
        _, scale, zero = quantize_groups(w, 4, 16, symmetric)
        assert all(torch.equal(a, b) for a, b in zip((scale, zero), group_params(w, 4, 16, symmetric, "minmax")))
        s, z = group_params(w, 4, 16, symmetric, "mse")
        assert (s <= scale).all()  # only ever shrinks the range


def test_gptq_model_error_is_below_rtn_on_calibration_inputs(tiny_llama):
    calib = calibration(8, 32)
    reference = load(tiny_llama)
    expected = logits(reference, calib)
    errors = {}
    for technique in QUANT:
        model = copy.deepcopy(reference)
        run(technique, model, calib, bits=4)
        errors[technique] = float((logits(model, calib) - expected).pow(2).mean())
    assert errors["gptq_quant"] < errors["rtn_quant"]
    assert errors["awq_quant"] <= errors["rtn_quant"]


def test_blockwise_calibration_replays_block_inputs_exactly(tiny_models):
    # Without quantizing anything, block-by-block stats equal those of one pass of the model.
    model = load(tiny_models["llama"])
    layers = select_linears(model, DEFAULT_TARGETS)
    calib = calibration(4, 16)
    one_pass = collect_input_stats(model, layers, calib, gram=True)
    steps = list(calibrate_blocks(model, layers, calib, gram=True))
    assert [s.name for s in steps] == ["model.layers.0", "model.layers.1"]
    for step in steps:
        for name, _ in step.layers:
            assert step.stats[name].tokens == one_pass[name].tokens
            torch.testing.assert_close(step.stats[name].gram, one_pass[name].gram, rtol=1e-5, atol=1e-6)


# --- AWQ ----------------------------------------------------------------------------------------


def test_awq_scale_search_beats_rtn_with_salient_channels():
    x = correlated_inputs(outliers=(3, 17, 90))
    gram = x.t() @ x / len(x)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    s, err, rtn = search_scale([w], x.abs().mean(0), gram, bits=4, group_size=-1, symmetric=True)
    assert rtn == pytest.approx(output_error(w - fake_quant(w, 4, -1, True), gram))
    assert err == pytest.approx(output_error(w - fake_quant(w * s, 4, -1, True) / s, gram))
    assert err < 0.9 * rtn
    assert s[[3, 17, 90]].min() > s.median()  # salient channels get the larger scales
    clipped = clip_search(w * s, gram / (s[:, None] * s[None, :]), bits=4, group_size=-1, symmetric=True)
    assert output_error(w - fake_quant(clipped, 4, -1, True) / s, gram) <= err * (1 + 1e-6)


def test_awq_folds_scales_into_norms_and_projections(tiny_models):
    model = load(tiny_models["llama"])
    ids = calibration(2, 16, seed=1)
    before = logits(model, ids)
    norms = [model.model.layers[i].input_layernorm.weight.clone() for i in range(2)]
    change = run("awq_quant", model, bits=8)
    assert change["unscaled_layers"] == []  # q/k/v, o (grouped-query), gate/up and down all folded
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norms[0])
    assert (logits(model, ids) - before).abs().max() < 0.02 * before.abs().max()
    gpt2 = load(tiny_models["gpt2"])
    assert run("awq_quant", gpt2, bits=8)["unscaled_layers"] == [
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]  # after GELU


def test_awq_undoes_a_fold_that_changes_the_output(tiny_models):
    # Post-norm OPT: self_attn_layer_norm comes after attention, so q/k/v do not read it.
    config = AutoConfig.for_model("opt", vocab_size=VOCAB, do_layer_norm_before=False, **TINY_CONFIGS["opt"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = calibration(2, 16, seed=1)
    before = logits(model, ids)
    change = run("awq_quant", model, bits=8)
    assert "model.decoder.layers.0.self_attn.q_proj" in change["unscaled_layers"]
    assert (logits(model, ids) - before).abs().max() < 0.02 * before.abs().max()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("technique", QUANT)
def test_group_size_that_does_not_divide_names_the_layer_and_the_fix(tiny_llama, technique):
    with pytest.raises(TechniqueError) as info:
        run(technique, load(tiny_llama), group_size=48, indivisible="error")
    message = error_message(info)
    assert (
        "group_size 48" in message and "in_features 64" in message and "model.layers.0" in message and "32" in message
    ) and "indivisible: per_channel" in message


def test_targets_matching_nothing_is_one_error(tiny_llama):
    with pytest.raises(TechniqueError) as info:
        run("gptq_quant", load(tiny_llama), targets=("*.nothing.*",))
    assert "match no linear layer" in error_message(info)


def test_odd_width_int4_is_refused():
    model = nn.Module()
    model.mlp = nn.Linear(63, 8)
    with pytest.raises(TechniqueError) as info:
        run("rtn_quant", model, bits=4, targets=("mlp",))
    assert "odd in_features 63" in error_message(info)


@pytest.mark.parametrize("technique", ["gptq_quant", "awq_quant"])
def test_calibrating_techniques_need_calibration_text(tiny_llama, technique):
    t = get_technique(technique)
    with pytest.raises(TechniqueError, match="needs calibration text"):
        t.apply(load(tiny_llama), t.config_cls(), Context())
    assert t.needs_calibration and not get_technique("rtn_quant").needs_calibration


@pytest.mark.parametrize("technique", QUANT)
def test_recipe_rejects_bad_options(technique):
    _, problems = parse_recipe({"stages": [{"technique": technique, "bits": 3}]})
    assert len(problems) == 1 and "'bits' must be 4 | 8, got 3" in problems[0]
    _, problems = parse_recipe({"stages": [{"technique": technique, "group_size": 0}]})
    assert len(problems) == 1 and "group_size must be -1" in problems[0]
    _, problems = parse_recipe({"stages": [{"technique": technique, "groupsize": 128}]})
    assert "did you mean 'group_size'" in problems[0]


def test_recipe_rejects_bad_gptq_damping():
    _, problems = parse_recipe({"stages": [{"technique": "gptq_quant", "damp_percent": 0.0}]})
    assert len(problems) == 1 and "damp_percent must be in (0, 1]" in problems[0]


# --- end to end on stories260K ------------------------------------------------------------------


@pytest.mark.integration
@needs_assets()
def test_gptq_and_awq_recover_most_of_rtn4_perplexity_on_stories260k():
    from frugalm.measure.quality import score_text
    from frugalm.models import load_model
    from frugalm.techniques._calibrate import sample_calibration
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    docs = split_documents(read_text(TINYSTORIES))
    lm = load_model(STORIES, fast_kernels=False)
    evaluated = encode_documents(lm.tokenizer, docs, 8192)
    calib = sample_calibration(lm.tokenizer, docs[len(evaluated.docs) :], 128, 512, seed=0)  # never the evaluated text

    def ppl(model) -> float:
        s = score_text(model, evaluated, 512, 256)
        return math.exp(s.nll_sum / s.n_predicted)

    dense = ppl(lm.model)
    results = {}
    for technique in QUANT:  # in_features 64 and 172: per-channel 4-bit, the hard case for RTN
        model = load_model(STORIES, fast_kernels=False).model
        run(technique, model, calib, bits=4, group_size=-1)
        results[technique] = ppl(model)
    rtn_increase = results["rtn_quant"] - dense
    assert rtn_increase > 0.3  # RTN-4 per channel really hurts this model (3.53 -> 4.22)
    assert results["gptq_quant"] - dense <= 0.5 * rtn_increase, results
    assert results["awq_quant"] - dense <= 0.7 * rtn_increase, results


def test_a_quantized_tied_head_is_untied_saved_and_benchmarked(tiny_llama, text_file, tmp_path):
    from frugalm.benchmark.api import BenchConfig, bench
    from frugalm.measure.quality import PerplexityProtocol
    from frugalm.models import load_model, save_variant

    lm = load_model(tiny_llama, fast_kernels=False)
    embedding = lm.model.get_input_embeddings().weight.detach().clone()
    change = run(
        "rtn_quant", lm.model, bits=8, activations="dynamic-int8", targets=("*.mlp.*", "*.self_attn.*", "lm_head")
    )
    assert "lm_head" in change["layers"] and not lm.model.config.tie_word_embeddings
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "v", {})
    again = load_model(artifact)  # fbgemm kernels where the CPU has them, the head included
    assert torch.equal(again.model.get_input_embeddings().weight, embedding)  # the embedding stays float
    config = BenchConfig(
        data=str(text_file),
        workloads=("chat",),
        metrics=("ppl_tok", "decode_tok_s"),
        repetitions=1,
        protocol=PerplexityProtocol(max_tokens=256),
    )
    measured = {m.metric: m for m in bench(artifact, config, store=tmp_path / "s.db").measurements}
    figures = {k: m.value for k, m in measured.items()}
    base = {m.metric: m.value for m in bench(tiny_llama, config, store=tmp_path / "s.db").measurements}
    assert figures["ppl_tok"] == pytest.approx(base["ppl_tok"], rel=0.02) and figures["decode_tok_s"] > 0
    # The measuring child says what ran: on x86 every int8 layer, the head included, on fbgemm as w8a8-dynamic
    protocol = measured["decode_tok_s"].protocol
    if X86:
        assert protocol["kernels"] == {"fbgemm": 15}
        assert protocol["formats"] == {"w8a8-dynamic": {"fbgemm": 15}}
        assert protocol["quantized_engine"] == "fbgemm"
    else:
        assert sum(protocol["kernels"].values()) == 15 and list(protocol["formats"]) == ["w8a8-dynamic"]
