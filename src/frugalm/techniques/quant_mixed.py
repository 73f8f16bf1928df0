"""Per-layer mixed precision under a budget: each layer gets the format its sensitivity earns.

Formats are bit widths (4, 8) times groupings (per output channel, or groups of 32 input
columns where 32 divides the layer's inputs), each layer choosing among those that fit it.

1. Sensitivity. For every targeted layer and every format, only that layer's weight is replaced
   by its dequantized codes, quantized as `method` quantizes it (GPTQ: from its Hessian of the
   float model's calibration inputs, one calibration pass for all layers), and the mean
   next-token KL divergence of the model's predictions from the float model's is measured on
   the calibration tokens (at most `probe_tokens` of them). Measured KL rather than a Fisher or
   Hessian proxy: it is the quantity the allocation minimizes and the quality figures report,
   it needs forward passes only, and on the small models this tool targets (layers x formats
   forwards) it takes a minute or two. (Probing with RTN while quantizing with GPTQ ranked the
   layers worse.) The pass's wall time is recorded with the stage (`sensitivity_s`, inside
   produce_wall_s: a production cost).
2. Allocation. KL increases are taken as additive over layers (on stories260K the sum predicted
   0.0491 nats where the quantized model measured 0.0488). Every layer starts at its cheapest
   format and the step along its convex hull of (bits, KL) with the most KL saved per bit is
   taken while it fits the budget: the greedy of the multiple-choice knapsack, optimal for its
   LP relaxation and within one layer's step of the budget. Budgets: `bits`: average stored bits
   per weight of the targeted layers, codes plus float16 scales and uint8 zero points; `mib`:
   the whole model's weights as stored (every parameter and buffer; at load on CPU an int4
   layer also holds int8 codes for prefill, which `weights_mib` counts). A budget below the
   cheapest allocation is refused with the minimum; one above the widest gives every layer its
   most precise format. `ms`: milliseconds per decode step at batch 1 (one token from a 128-token
   cache, float32 activations) on this machine, from latencies measured per layer and format on
   the kernels a loaded variant uses (techniques/_layer_latency; the step outside the targeted
   layers is the float step minus their float times); a format slower than a more precise one
   is never chosen. The profile is recorded with the stage and its seconds are production cost.
3. Quantization. The layers of each format are quantized by `method` (gptq_quant with its
   defaults, or rtn_quant), widest first; each keeps its own format (w8a16, w4a16) in the
   artifact and on the kernels.
"""

from __future__ import annotations

import glob
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.measure.memory import weights_bytes
from frugalm.runtime.modules import weight_out_in
from frugalm.runtime.quant_linear import dequantize_groups, quantize_groups
from frugalm.techniques import quant_gptq, quant_rtn
from frugalm.techniques._arch import DEFAULT_TARGETS
from frugalm.techniques._calibrate import calibrate_blocks
from frugalm.techniques._layer_latency import in_model_scale, layer_costs_ns, step_ns
from frugalm.techniques.base import Context, Technique, check_config, record_change, select_linears

Format = tuple[int, int]
"""(bits, group_size): 4 or 8 bits, in groups of that many input columns (-1: per output channel)."""


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig:
    budget: float = 5.0
    """The budget, in `budget_unit`."""
    budget_unit: Literal["bits", "mib", "ms"] = "bits"
    """bits: average stored bits per weight of the targeted layers (scales and zero points included); mib: the model's weights as stored (every parameter and buffer), MiB; ms: the decode step at batch 1 on this machine, measured per layer and format."""
    widths: tuple[int, ...] = (4, 8)
    """Candidate bits per layer (4 and/or 8)."""
    group_sizes: tuple[int, ...] = (-1, 32)
    """Candidate groupings per width: -1 (per output channel) and/or input columns per group; a group size applies to the layers whose in_features it divides."""
    method: Literal["gptq", "rtn"] = "gptq"
    """How each layer is quantized once its format is chosen."""
    symmetric: bool = True
    """Zero point fixed at the middle code; False: a zero point per group."""
    probe_tokens: int = 4096
    """Calibration tokens the sensitivity probes score (the float model's log-probabilities over them are held in memory)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """fnmatch patterns over module names; the output head is excluded unless named."""

    def problems(self) -> list[str]:
        problems = []
        if not self.widths or any(b not in (4, 8) for b in self.widths) or len(set(self.widths)) != len(self.widths):
            problems.append(f"widths must be distinct values among 4 and 8, got {list(self.widths)}")
        if not self.group_sizes or any(g == 0 or g < -1 for g in self.group_sizes):
            problems.append(
                f"group_sizes must be -1 (per output channel) or positive column counts (e.g. 32), got {list(self.group_sizes)}"
            )
        if not self.budget > 0:
            problems.append(f"budget must be positive (e.g. 5.0 average bits, or a MiB figure), got {self.budget}")
        if self.probe_tokens < 64:
            problems.append(f"probe_tokens must be at least 64, got {self.probe_tokens}")
        return problems

    def formats(self, in_features: int) -> list[Format]:
        """The formats a layer with `in_features` input columns can take."""
        return [(b, g) for b in self.widths for g in self.group_sizes
                if (g == -1 or in_features % g == 0) and not (b == 4 and in_features % 2)]  # fmt: skip


def format_name(fmt: Format) -> str:
    bits, group = fmt
    return f"int{bits}" + (f"-g{group}" if group > 0 else "")


def stored_bits(out_f: int, in_f: int, bits: int, group_size: int) -> int:
    """Bits a layer's weight is stored in: codes, plus a float16 scale and a uint8 zero point per group."""
    groups = 1 if group_size == -1 else in_f // group_size
    return out_f * in_f * bits + out_f * groups * 24


# --- 1. sensitivity ------------------------------------------------------------------------------


@torch.no_grad()
def _log_probs(model: nn.Module, tokens: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat(
        [F.log_softmax(model(tokens[i : i + batch]).logits.float(), -1) for i in range(0, len(tokens), batch)]
    )


def _probe_codes(config: MixedPrecisionConfig, model, layers, calibration: torch.Tensor):
    """codes(name, weight, format) -> (q, scale, zero) as `config.method` would quantize the layer alone."""
    if config.method == "rtn":
        return lambda name, w, fmt: quantize_groups(w, fmt[0], fmt[1], config.symmetric)
    stats = {}  # every layer's input statistics from the float model, one calibration pass
    for step in calibrate_blocks(model, layers, calibration, gram=True, sequential=False):
        stats.update(step.stats)

    def codes(name, w, fmt):
        options = quant_gptq.GPTQQuantConfig(bits=fmt[0], group_size=fmt[1], symmetric=config.symmetric)
        return quant_gptq.layer_codes(w, stats[name], options)

    return codes


@torch.no_grad()
def sensitivities(model, layers, formats, codes, tokens, report=None) -> dict[str, dict[Format, float]]:
    """{layer: {format: mean KL(float || only this layer quantized in that format by `codes`)}} over `tokens` (n, L)."""
    reference = _log_probs(model, tokens)
    out: dict[str, dict[Format, float]] = {}
    for i, (name, module) in enumerate(layers):
        w = weight_out_in(module)  # a view of the parameter (transposed for Conv1D)
        original = w.clone()
        out[name] = {}
        for fmt in formats[name]:
            q, scale, zero = codes(name, original.clone(), fmt)
            w.copy_(dequantize_groups(q, scale, zero, w.dtype))
            logp = _log_probs(model, tokens)
            out[name][fmt] = F.kl_div(logp, reference, log_target=True, reduction="none").sum(-1).mean().item()
        w.copy_(original)
        if report:
            report(i + 1, len(layers))
    return out


# --- 2. allocation -------------------------------------------------------------------------------


def _hull(cost: dict, loss: dict) -> list:
    """The options on the lower convex hull of (cost, loss), cheapest first: each step buys less loss per cost than the last."""
    hull: list = []
    for f in sorted(cost, key=lambda f: (cost[f], loss[f])):
        if hull and loss[f] >= loss[hull[-1]]:
            continue  # dominated: costs more, loses no less

        def slope(a, b):
            return (loss[a] - loss[b]) / max(cost[b] - cost[a], 1)

        while len(hull) >= 2 and slope(hull[-2], hull[-1]) <= slope(hull[-1], f):
            hull.pop()
        hull.append(f)
    return hull


def allocate(costs: dict[str, dict], losses: dict[str, dict], budget: float) -> dict:
    """An option per layer minimizing the summed loss with summed cost <= budget: the greedy of the
    multiple-choice knapsack (each layer's convex hull, steps taken by loss saved per cost while
    they fit). Raises ValueError when even the cheapest options exceed the budget."""
    hulls = {n: _hull(costs[n], losses[n]) for n in costs}
    at = dict.fromkeys(costs, 0)
    spent = sum(costs[n][h[0]] for n, h in hulls.items())
    if spent > budget:
        raise ValueError(spent)
    while True:
        steps = []
        for n, h in hulls.items():
            if at[n] + 1 < len(h):
                a, b = h[at[n]], h[at[n] + 1]
                extra = costs[n][b] - costs[n][a]
                if spent + extra <= budget:
                    steps.append(((losses[n][a] - losses[n][b]) / max(extra, 1), n, extra))
        if not steps:
            return {n: h[at[n]] for n, h in hulls.items()}
        _, n, extra = max(steps)
        at[n] += 1
        spent += extra


# --- the technique ------------------------------------------------------------------------------


def _budget(
    model, layers, config: MixedPrecisionConfig
) -> tuple[dict[str, dict[Format, int]], float, float, float, dict]:
    """(cost per layer and format, what the targeted layers may take, what is fixed outside them,
    the cost of one budget unit, the latency profile): costs in bits (per average bit, per MiB) or
    in measured ns (per ms)."""
    if config.budget_unit == "ms":
        return _latency_budget(model, layers, config)
    costs = {}
    for name, module in layers:
        out_f, in_f = weight_out_in(module).shape
        costs[name] = {fmt: stored_bits(out_f, in_f, *fmt) for fmt in config.formats(in_f)}
    if config.budget_unit == "bits":
        unit = sum(weight_out_in(m).numel() for _, m in layers)  # bits of budget per average bit
        return costs, config.budget * unit, 0.0, unit, {}
    fixed = 8 * weights_bytes(model) - sum(weight_out_in(m).numel() * 32 for _, m in layers)
    unit = 8 * 2**20
    return costs, config.budget * unit - fixed, fixed, unit, {}


def _latency_budget(model, layers, config: MixedPrecisionConfig):
    t0 = time.perf_counter()
    formats = {n: config.formats(weight_out_in(m).shape[1]) for n, m in layers}
    costs, floats, kernels = layer_costs_ns(layers, formats, config.symmetric)
    context = getattr(model.config, "max_position_embeddings", None) or 256
    prompt = min(128, context - 1)
    step = step_ns(model, prompt)
    fixed = max(0, step - sum(floats.values()))  # the step outside the targeted layers
    scale = in_model_scale(model, layers, costs, floats, fixed, config.symmetric, prompt)
    alone = costs
    costs = {n: {f: round(v * scale[f]) for f, v in d.items()} for n, d in alone.items()}
    profile = {"step_ns_float": step, "outside_layers_ns": fixed, "layer_ns_float": floats,
               "layer_ns": {n: {format_name(f): v for f, v in d.items()} for n, d in costs.items()},
               "layer_ns_alone": {n: {format_name(f): v for f, v in d.items()} for n, d in alone.items()},
               "in_model_scale": {format_name(f): v for f, v in scale.items()},
               "kernels": {n: {format_name(f): k for f, k in d.items()} for n, d in kernels.items()},
               "profile_s": time.perf_counter() - t0, "protocol": "one-row calls round-robin over a layer's formats, "
               "median of 7 samples of 50 calls, scaled per format to the measured step of the model with the format in every "
               "layer that takes it; the float step: one token from a 128-token cache, median of 7 x 10"}  # fmt: skip
    return costs, config.budget * 1e6 - fixed, fixed, 1e6, profile


def apply(model: nn.Module, config: MixedPrecisionConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    layers = select_linears(model, config.targets, technique=name)
    for layer_name, module in layers:
        in_f = weight_out_in(module).shape[1]
        if not config.formats(in_f):
            raise TechniqueError(
                f"{name}: no candidate format fits layer '{layer_name}' (in_features {in_f}): add group size -1 to group_sizes, or bits 8 to widths for odd widths"
            )
    costs, budget, fixed, unit, profile = _budget(model, layers, config)
    narrowest = sum(min(c.values()) for c in costs.values())
    if narrowest > budget:
        need = (narrowest + fixed) / unit
        raise TechniqueError(
            f"{name}: a budget of {config.budget} {config.budget_unit} is below the cheapest allocation ({need:.3f} {config.budget_unit}); raise the budget"
        )
    calibration = ctx.calibration_tokens(name)
    tokens = calibration[: max(1, config.probe_tokens // calibration.shape[1])]
    t0 = time.perf_counter()
    codes = _probe_codes(config, model, layers, calibration)
    losses = sensitivities(model, layers, {n: list(c) for n, c in costs.items()}, codes, tokens,
                           report=lambda done, total: ctx.report(f"{name} sensitivity", done, total))  # fmt: skip
    sensitivity_s = time.perf_counter() - t0
    choice = allocate(costs, losses, budget)
    quantize_as(model, choice, config, ctx)
    spent = sum(costs[n][f] for n, f in choice.items())
    weights = sum(weight_out_in(m).numel() for _, m in layers)
    record_change(
        ctx,
        name,
        list(choice),
        weights,
        model,
        method=config.method,
        budget=f"{config.budget} {config.budget_unit}",
        allocation={n: format_name(f) for n, f in choice.items()},
        layers_per_format=dict(Counter(format_name(f) for f in choice.values())),
        budget_used=(spent + fixed) / unit,
        average_bits=spent / weights,
        predicted_kl_nats=sum(losses[n][f] for n, f in choice.items()),
        sensitivity_kl_nats={n: {format_name(f): v for f, v in d.items()} for n, d in losses.items()},
        sensitivity_probe=f"{config.method} of one layer at a time, mean next-token KL from the float model",
        sensitivity_tokens=int(tokens.numel()),
        sensitivity_s=sensitivity_s,
        **({"latency_profile": profile} if profile else {}),
    )
    return model


def quantize_as(model: nn.Module, choice: dict[str, Format], config: MixedPrecisionConfig, ctx: Context) -> None:
    """Quantize each layer in its chosen format with `config.method`, widest formats first."""
    inner = Context(device=ctx.device, calibration=ctx.calibration, progress=ctx.progress)
    technique = quant_gptq.TECHNIQUE if config.method == "gptq" else quant_rtn.TECHNIQUE
    for bits, group in sorted(set(choice.values()), reverse=True):
        chosen = tuple(glob.escape(n) for n, f in choice.items() if f == (bits, group))
        options = {"bits": bits, "group_size": group, "symmetric": config.symmetric, "targets": chosen}
        technique.apply(model, technique.config_cls(**options), inner)


TECHNIQUE = Technique(
    name="mixed_precision_quant",
    config_cls=MixedPrecisionConfig,
    apply=apply,
    kind="quantization",
    needs_calibration=True,
)
