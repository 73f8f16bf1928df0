"""Per-layer mixed precision: the allocation, the budgets, the formats it leaves, its errors."""

from __future__ import annotations

import json

import pytest

from conftest import calibration, error_message, load, run
from frugalm.cli import main
from frugalm.errors import TechniqueError
from frugalm.measure.memory import weights_bytes
from frugalm.models import load_model, save_variant
from frugalm.runtime import cpu_kernels
from frugalm.runtime.modules import inference_settings, is_linear, weight_out_in
from frugalm.runtime.quant_linear import QuantLinear
from frugalm.techniques.base import Context
from frugalm.techniques.quant_mixed import TECHNIQUE, MixedPrecisionConfig, _hull, allocate, stored_bits


def test_allocation_spends_the_budget_where_it_saves_most():
    costs = {"a": {4: 10, 8: 20}, "b": {4: 10, 8: 20}, "c": {4: 10, 8: 20}}
    losses = {"a": {4: 5.0, 8: 0.1}, "b": {4: 1.0, 8: 0.1}, "c": {4: 3.0, 8: 0.1}}
    assert allocate(costs, losses, 30) == {"a": 4, "b": 4, "c": 4}
    assert allocate(costs, losses, 45) == {"a": 8, "b": 4, "c": 4}  # one upgrade fits: the one that saves most
    assert allocate(costs, losses, 50) == {"a": 8, "b": 4, "c": 8}
    assert allocate(costs, losses, 1000) == {"a": 8, "b": 8, "c": 8}
    with pytest.raises(ValueError):
        allocate(costs, losses, 29)


def test_the_hull_drops_options_that_buy_less_than_a_cheaper_step():
    cost = {"x": 1, "y": 2, "z": 3, "w": 4}
    loss = {"x": 10.0, "y": 9.5, "z": 2.0, "w": 3.0}  # y: a poor step on the way to z; w: dominated by z
    assert _hull(cost, loss) == ["x", "z"]


def _apply(path, **options):
    model = load(path)
    ctx = Context(calibration=calibration())
    TECHNIQUE.apply(model, MixedPrecisionConfig(**options), ctx)
    return model, ctx.changes[-1]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_bits_budget_gives_layers_different_formats_within_it(tiny_llama, method):
    model, change = _apply(tiny_llama, method=method, budget=6.0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(change["allocation"]) and len(layers) == 14
    assert {m.bits for m in layers.values()} == {4, 8}  # 6 bits: some of each
    stored = sum(stored_bits(m.out_features, m.in_features, m.bits, m.group_size) for m in layers.values())
    assert change["average_bits"] == pytest.approx(
        stored / sum(m.in_features * m.out_features for m in layers.values())
    )
    assert 5.0 < change["average_bits"] <= 6.0
    assert change["sensitivity_s"] > 0 and change["predicted_kl_nats"] > 0
    formats = inference_settings(model)["linear_formats"]
    assert set(formats) == {"w4a16", "w8a16"} and sum(len(v) for v in formats.values()) == 14


def test_a_mib_budget_is_met_within_one_layer(tiny_llama):
    base = load(tiny_llama)
    linears = [m for n, m in base.named_modules() if is_linear(m) and "lm_head" not in n]
    steps = [stored_bits(*weight_out_in(m).shape, 8, -1) - stored_bits(*weight_out_in(m).shape, 4, 32) for m in linears]
    narrowest = weights_bytes(base) - sum(weight_out_in(m).numel() * 4 for m in linears)
    narrowest += sum(stored_bits(*weight_out_in(m).shape, 4, 32) for m in linears) / 8  # not the cheapest, near it
    budget = (narrowest + 3 * max(steps) / 8) / 2**20
    model, change = _apply(tiny_llama, method="rtn", budget=budget, budget_unit="mib")
    got = weights_bytes(model) / 2**20
    assert got <= budget and budget - got < max(steps) / 8 / 2**20
    assert change["budget_used"] == pytest.approx(got)


def test_the_variant_saves_and_loads_in_its_formats(tiny_llama, tmp_path):
    lm = load_model(tiny_llama, fast_kernels=False)
    ctx = Context(calibration=calibration())
    model = TECHNIQUE.apply(lm.model, MixedPrecisionConfig(method="rtn", budget=6.0), ctx)
    folder = save_variant(model, lm.tokenizer, tmp_path / "mixed", {"changes": ctx.changes})
    saved = json.loads((folder / "frugalm.json").read_text())["inference"]["linear_formats"]
    again = load_model(folder, fast_kernels=False).model
    bits = {n: m.bits for n, m in again.named_modules() if isinstance(m, QuantLinear)}
    assert {n: 8 for n in saved["w8a16"]} | {n: 4 for n in saved["w4a16"]} == bits


def test_errors_are_one_line(tiny_llama):
    with pytest.raises(TechniqueError) as exc:
        _apply(tiny_llama, method="rtn", budget=3.0)
    assert "below the cheapest allocation" in error_message(exc) and "raise the budget" in error_message(exc)
    with pytest.raises(TechniqueError) as exc:
        run("mixed_precision_quant", load(tiny_llama), widths=(4, 8), group_sizes=(48,))  # divides no layer
    assert "add group size -1" in error_message(exc)


def test_a_bad_recipe_is_refused_before_loading(tmp_path, capsys):
    recipe = tmp_path / "m.yaml"
    recipe.write_text(
        "version: 1\nname: m\nstages:\n  - technique: mixed_precision_quant\n    widths: [3, 8]\n    budgit: 5\n"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "widths" in err and "budgit" in err and "budget" in err


def test_a_ms_budget_is_spent_on_measured_latencies(tiny_llama):
    """Budget in ms per decode step: costs are the layers' measured one-row latencies per format, on their kernels."""
    _, change = _apply(tiny_llama, method="rtn", budget=1000.0, budget_unit="ms")
    profile = change["latency_profile"]
    assert profile["step_ns_float"] > 0 and set(profile["layer_ns"]) == set(change["allocation"])
    assert all(v > 0 for d in profile["layer_ns"].values() for v in d.values())
    int8 = "frugalm-int8-rows" if cpu_kernels.available() else "int8pack"  # its kernel where it builds, else ATen's
    assert f"{int8}-bf16" in " ".join(k for d in profile["kernels"].values() for k in d.values())
    assert change["budget_used"] <= 1000.0  # predicted ms per step
    losses = change["sensitivity_kl_nats"]
    assert all(change["allocation"][n] == min(d, key=d.get) for n, d in losses.items())  # no limit: least loss each
    with pytest.raises(TechniqueError) as exc:
        _apply(tiny_llama, method="rtn", budget=1e-6, budget_unit="ms")
    assert "below the cheapest allocation" in error_message(exc) and "ms" in error_message(exc)
