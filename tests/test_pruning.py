"""Pruning techniques: magnitude, Wanda, SparseGPT (zeros in place) and structured (smaller shapes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import (
    STORIES,
    TINYSTORIES,
    calibration,
    error_message,
    load,
    needs_assets,
    run,
)
from frugalm.errors import TechniqueError
from frugalm.recipe import parse_recipe
from frugalm.registry import get_technique
from frugalm.runtime.modules import weight_out_in
from frugalm.techniques._arch import ARCHS, DEFAULT_TARGETS
from frugalm.techniques._calibrate import calibrate_blocks, collect_input_stats
from frugalm.techniques.base import Context, select_linears
from frugalm.techniques.prune_magnitude import prune_mask
from frugalm.techniques.prune_sparsegpt import sparsegpt_weights
from frugalm.techniques.prune_wanda import wanda_mask

ARCHS_ALL = ["llama", "gpt2", "gpt_neox", "opt", "qwen2"]
UNSTRUCTURED = ["magnitude_prune", "wanda_prune", "sparsegpt_prune"]


# --- unstructured and N:M ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS_ALL)
@pytest.mark.parametrize("technique", UNSTRUCTURED)
def test_achieved_sparsity_is_the_requested_one_in_every_layer(tiny_models, arch, technique):
    model = load(tiny_models[arch])
    change = run(technique, model, sparsity=0.3)
    layers = select_linears(model, DEFAULT_TARGETS)
    assert change["layers"] == [n for n, _ in layers]  # MLP and attention of every block; not lm_head
    assert len(layers) == {"llama": 14, "qwen2": 14, "gpt2": 8, "gpt_neox": 8, "opt": 12}[arch]
    for name, module in layers:
        w = weight_out_in(module)  # (out, in)
        per_row = (w == 0).float().mean(1)
        if technique == "wanda_prune":  # exact per row
            assert torch.allclose(per_row, torch.full_like(per_row, round(0.3 * w.shape[1]) / w.shape[1])), name
        assert abs(float((w == 0).float().mean()) - 0.3) <= 1 / w.shape[1], name
    assert change["sparsity_achieved"] == pytest.approx(0.3, abs=0.01)
    assert torch.isfinite(model(calibration(1, 16)).logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D, weight stored (in, out)
@pytest.mark.parametrize("technique", UNSTRUCTURED)
def test_n_m_pattern_holds_in_every_group(tiny_models, arch, technique):
    model = load(tiny_models[arch])
    change = run(technique, model, pattern="2:4")
    assert change["pattern"] == "2:4" and change["sparsity_achieved"] == 0.5
    for name, module in select_linears(model, DEFAULT_TARGETS):
        w = weight_out_in(module)
        zeros_per_group = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)  # (out, in/4)
        assert (zeros_per_group >= 2).all(), name


def test_prune_mask_counts_are_exact_with_ties():
    scores = torch.ones(4, 8)  # all tied
    assert prune_mask(scores, 0.5, None, per_row=True).sum(1).tolist() == [4] * 4
    assert int(prune_mask(scores, 0.3, None, per_row=False).sum()) == round(0.3 * 32)
    assert (prune_mask(scores, 0.0, (1, 4), per_row=True).reshape(4, 2, 4).sum(-1) == 3).all()


def outlier_llama(path):
    """Tiny Llama whose norm gains are log-normal: trained LLMs have a few large input features
    (Dettmers et al. 2022), which random init lacks and which is what Wanda exploits."""
    model = load(path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.randn(p.shape, generator=g).mul(1.0).exp())
    return model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layer_output_error_wanda_below_magnitude_and_sparsegpt_below_wanda(tiny_llama, pattern):
    model = outlier_llama(tiny_llama)
    layers = select_linears(model, DEFAULT_TARGETS)
    stats = collect_input_stats(model, layers, calibration(16, 64), gram=True)
    nm = None if pattern == "unstructured" else (2, 4)
    errors = {"magnitude": 0.0, "wanda": 0.0, "sparsegpt": 0.0}
    for name, module in layers:
        w, gram = weight_out_in(module).detach().float(), stats[name].gram.float()  # (out, in), (in, in) = X^T X

        def output_error(w_pruned):  # ||X W^T - X W'^T||_F^2 = tr(dW X^T X dW^T)
            dw = w - w_pruned
            return float(((dw @ gram) * dw).sum())

        magnitude = output_error(w.masked_fill(prune_mask(w.abs(), 0.5, nm, per_row=False), 0))
        wanda = output_error(w.masked_fill(wanda_mask(w, stats[name].feature_norm, 0.5, nm), 0))
        sparsegpt_w, mask = sparsegpt_weights(w, stats[name].gram, 0.5, nm)
        assert (sparsegpt_w[mask] == 0).all() and mask.float().mean() == 0.5
        sparsegpt = output_error(sparsegpt_w)
        assert sparsegpt < wanda, name  # reconstruction beats mask selection alone, layer by layer
        for key, value in (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt)):
            errors[key] += value
    assert errors["wanda"] <= errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]


def test_block_wise_calibration_stops_early_and_matches_a_full_pass(tiny_models):
    model = load(tiny_models["opt"])  # OPT: fc1/fc2 sit directly on the block
    layers = select_linears(model, DEFAULT_TARGETS)
    tokens = calibration(4, 32)
    full = collect_input_stats(model, layers, tokens, gram=True)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    steps = list(calibrate_blocks(model, layers, tokens, gram=True))
    hook.remove()
    assert [s.module for s in steps] == list(model.model.decoder.layers)
    assert [n for s in steps for n, _ in s.layers] == [n for n, _ in layers]
    for step in steps:
        for name, _ in step.layers:
            assert step.stats[name].tokens == full[name].tokens
            torch.testing.assert_close(step.stats[name].gram, full[name].gram, rtol=1e-6, atol=1e-8)
    assert not calls  # the forward pass stopped at block 0, then replayed block by block: the head never ran


@pytest.mark.parametrize("sequential", [True, False])
def test_calibration_sees_changed_blocks_only_when_sequential(tiny_llama, sequential):
    model = load(tiny_llama)
    layers = select_linears(model, DEFAULT_TARGETS)
    tokens = calibration(4, 16)
    dense = collect_input_stats(model, layers, tokens)
    for step in calibrate_blocks(model, layers, tokens, gram=False, sequential=sequential):
        same = all(torch.allclose(step.stats[n].sq_sum, dense[n].sq_sum) for n, _ in step.layers)
        assert same == (step.name == "model.layers.0" or not sequential), step.name
        for _, module in step.layers:  # change the block: later blocks see it only when sequential
            module.weight.data.mul_(0.5)


def test_wanda_one_pass_and_sequential_differ_only_after_the_first_block(tiny_llama):
    one_pass, sequential = load(tiny_llama), load(tiny_llama)
    calib = calibration(seq_len=64)
    run("wanda_prune", one_pass, calib, sequential=False)
    run("wanda_prune", sequential, calib, sequential=True)
    w = lambda m, i: m.model.layers[i].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(w(one_pass, 0), w(sequential, 0))  # block 0 sees the same dense inputs
    assert not torch.equal(w(one_pass, 1), w(sequential, 1))  # block 1 sees block 0 pruned, or not


# --- structured ------------------------------------------------------------------------------------

STRUCTURED_CASES = [(a, u) for a in ("llama", "qwen2") for u in ("mlp_channels", "heads", "layers")] + [
    (a, u) for a in ("gpt2", "opt", "gpt_neox") for u in ("mlp_channels", "layers")
]


def unit_params(model, arch: str, unit: str) -> int:
    """Parameters of the parts that `unit` shrinks: MLPs, attention projections, or all blocks."""
    a = ARCHS[arch]
    blocks = list(model.get_submodule(a.blocks))
    names = {
        "mlp_channels": (*a.mlp_in, a.mlp_out),
        "heads": tuple(f"{a.attn}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    }.get(unit)
    if names is None:
        return sum(p.numel() for b in blocks for p in b.parameters())
    # weights only: biases of the output projection stay whole
    return sum(b.get_submodule(n).weight.numel() for b in blocks for n in names)


@pytest.mark.parametrize("arch,unit", STRUCTURED_CASES)
def test_structured_shrinks_generates_and_reloads_identically(tiny_models, tmp_path, arch, unit):
    model = load(tiny_models[arch])
    before = unit_params(model, arch, unit)
    importance = "magnitude" if arch in ("qwen2", "opt") else "activation"
    change = run("structured_prune", model, unit=unit, fraction=0.5, importance=importance)
    assert unit_params(model, arch, unit) == pytest.approx(before * 0.5, rel=0.02)
    assert change["params_removed"] > 0 and change["new_sizes"]
    ids = calibration(1, 10, seed=3)
    with torch.no_grad():
        logits = model(ids).logits
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.isfinite(logits).all() and torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


@pytest.mark.parametrize("unit", ["mlp_channels", "heads"])
def test_structured_removal_equals_zeroing_what_feeds_the_output_projection(tiny_llama, unit):
    """Removing channels/heads computes exactly what the dense model computes with the output
    projection's columns for them zeroed: checks which rows and columns were cut."""
    model, reference = load(tiny_llama), load(tiny_llama)
    run("structured_prune", model, unit=unit, fraction=0.5, importance="activation")
    for block, ref in zip(model.model.layers, reference.model.layers):
        cut, full = (
            (block.mlp.up_proj, ref.mlp.up_proj)
            if unit == "mlp_channels"
            else (block.self_attn.q_proj, ref.self_attn.q_proj)
        )
        kept = [int((full.weight == row).all(1).nonzero()[0]) for row in cut.weight]  # kept rows of the full layer
        out = ref.mlp.down_proj if unit == "mlp_channels" else ref.self_attn.o_proj
        with torch.no_grad():
            zero = torch.ones(out.weight.shape[1], dtype=torch.bool)
            zero[kept] = False
            out.weight[:, zero] = 0
    ids = calibration(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_structured_layers_drop_the_lowest_block_influence(tiny_llama):
    model = load(tiny_llama)
    change = run("structured_prune", model, unit="layers", fraction=0.5, importance="activation")
    assert len(change["units_removed"]) == 1 and model.config.num_hidden_layers == 1
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0]


# --- bad inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("technique", UNSTRUCTURED)
@pytest.mark.parametrize(
    "options,expected",
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"pattern": "4:2"}, "pattern must be"),
        ({"pattern": "2-4"}, "pattern must be"),
    ],
)
def test_bad_options_are_reported_by_problems_and_by_recipe_validation(technique, options, expected):
    config = get_technique(technique).config_cls(**options)
    assert any(expected in p for p in config.problems())
    assert get_technique(technique).config_cls().problems() == []
    recipe, problems = parse_recipe({"stages": [{"technique": technique, **options}]})
    assert recipe is None and len(problems) == 1 and expected in problems[0] and "\n" not in problems[0]


def test_structured_and_sparsegpt_specific_problems():
    cls = get_technique("structured_prune").config_cls
    assert cls().problems() == []
    assert any("fraction must be in (0, 1)" in p for p in cls(fraction=1.0).problems())
    _, problems = parse_recipe({"stages": [{"technique": "structured_prune", "unit": "neurons"}]})
    assert len(problems) == 1 and "'mlp_channels' | 'heads' | 'layers'" in problems[0]
    sparsegpt = get_technique("sparsegpt_prune").config_cls
    assert any("multiple of M=4" in p for p in sparsegpt(pattern="2:4", blocksize=126).problems())


@pytest.mark.parametrize("technique", UNSTRUCTURED)
def test_targets_matching_nothing_is_a_one_line_error(tiny_llama, technique):
    with pytest.raises(TechniqueError) as exc:
        run(technique, load(tiny_llama), targets=("*.nonexistent.*",))
    assert "match no linear layer" in error_message(exc)


@pytest.mark.parametrize("technique", UNSTRUCTURED)
def test_n_m_with_m_not_dividing_in_features_is_a_one_line_error(tiny_llama, technique):
    with pytest.raises(TechniqueError) as exc:
        run(technique, load(tiny_llama), pattern="2:5")  # in_features 64 and 128
    message = error_message(exc)
    assert "M=5 to divide in_features" in message and "model.layers.0" in message
    assert "e.g. '4:8'" in message  # an example that fits the layer


def test_the_n_m_hint_fits_the_layer(tiny_llama):
    from frugalm.techniques.prune_magnitude import check_groups

    layer = torch.nn.Linear(150, 8)
    with pytest.raises(TechniqueError, match=r"e\.g\. '1:2'"):
        check_groups("wanda_prune", [("odd", layer)], (2, 4))
    with pytest.raises(TechniqueError, match="has 151; narrow `targets`$"):
        check_groups("wanda_prune", [("prime", torch.nn.Linear(151, 8))], (2, 4))


@pytest.mark.parametrize("technique", ["wanda_prune", "sparsegpt_prune"])
def test_missing_calibration_is_a_one_line_error(tiny_llama, technique):
    t = get_technique(technique)
    with pytest.raises(TechniqueError) as exc:
        t.apply(load(tiny_llama), t.config_cls(), Context())
    assert "calibration" in error_message(exc)


def test_structured_unsupported_combinations_are_one_line_errors(tiny_models):
    with pytest.raises(TechniqueError) as exc:
        run("structured_prune", load(tiny_models["gpt2"]), unit="heads")
    assert "supports model types ['llama', 'qwen2'], not 'gpt2'" in error_message(exc)
    with pytest.raises(TechniqueError) as exc:  # 0.1 of 2 layers rounds to 0
        run("structured_prune", load(tiny_models["llama"]), unit="layers", fraction=0.1)
    assert "removes 0" in error_message(exc)


# --- a real model -------------------------------------------------------------------------------------


@pytest.mark.integration
@needs_assets()
def test_stories260k_perplexity_wanda_and_sparsegpt_beat_magnitude():
    """Perplexity on TinyStories: 512-token non-overlapping windows over the first 8,192 tokens;
    calibration 16 x 256 tokens drawn from the documents after those."""
    from frugalm.measure.quality import score_text
    from frugalm.models import load_model
    from frugalm.techniques._calibrate import sample_calibration
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    lm = load_model(STORIES, fast_kernels=False)
    docs = split_documents(read_text(TINYSTORIES))
    encoded = encode_documents(lm.tokenizer, docs, 8_192)
    calib = sample_calibration(lm.tokenizer, docs[len(encoded.docs) :], 16, 256, seed=0)

    def perplexity(model) -> float:
        scores = score_text(model, encoded, 512, 512)
        return math.exp(scores.nll_sum / scores.n_predicted)

    dense = perplexity(lm.model)
    assert 3 < dense < 5
    for pattern in ("unstructured", "2:4"):
        ppl = {}
        for technique in UNSTRUCTURED:
            model = copy.deepcopy(lm.model)
            run(technique, model, calib, sparsity=0.5, pattern=pattern)
            ppl[technique] = perplexity(model)
        gap = abs(ppl["sparsegpt_prune"] - ppl["wanda_prune"]) / dense
        print(
            f"stories260K {pattern} 50%: dense {dense:.3f}, "
            + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
            + f"; |sparsegpt - wanda| / dense = {gap:.3f}"
        )
        assert dense < ppl["wanda_prune"] <= ppl["magnitude_prune"]
        assert ppl["sparsegpt_prune"] <= ppl["magnitude_prune"]
