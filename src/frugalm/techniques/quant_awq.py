"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978).

A few input channels carry large activations; their weights matter most. AWQ multiplies each
input column j of W by s_j = mean|x_j|^alpha (normalized so sqrt(max s * min s) = 1) before
round-to-nearest, and divides the input by s_j, so salient columns are quantized on a finer
relative grid. alpha is grid-searched over `grid` points in [0, 1] per group of layers sharing
an input, minimizing sum ||X W^T - X (Q(W diag s) / s)^T||^2 over the calibration inputs
(computed exactly from the Gram matrix X^T X). alpha = 0 is plain RTN, so the chosen scales
never give a larger error on the calibration inputs than RTN. Then, with `clip`, each weight
group's clipping range is searched (shrink 0-45%, the reference "auto_clip", scoring each group
by its own share of the output error; skipped for q/k projections, whose errors reach the
output through the softmax), and the layer is stored by RTN as a `QuantLinear`.

Where the 1/s goes: folded, exactly, into the op that produces the input
- RMSNorm/LayerNorm weight (and bias) before q/k/v (Llama, Qwen2, OPT, GPT-2 c_attn, GPT-NeoX
  query_key_value) and before gate/up (fc1, c_fc, dense_h_to_4h);
- the rows of v_proj before o_proj (the v third of GPT-2 c_attn before c_proj, the v slices of
  GPT-NeoX query_key_value before dense); with grouped-query attention s is shared by the query
  heads that read one kv head, so it still folds;
- the rows of up_proj before down_proj (of fc1 before fc2: ReLU commutes with positive scales).
Each fold is checked by re-running the block on a calibration batch; a fold that changes the
block's output (an unfamiliar norm, a post-norm model) is undone. A layer with no foldable
predecessor (GPT-2 mlp.c_proj and GPT-NeoX dense_4h_to_h after GELU; layers outside the decoder
blocks) keeps s = 1: it gets plain RTN plus clipping, not an explicit input-scale module, so the
artifact stays plain QuantLinear layers that `load_model` rebuilds. These are listed as
`unscaled_layers` in the change record.

Calibration is sequential: block by block on the outputs of the already quantized blocks
(`_calibrate.calibrate_blocks`). Does not change the storage format or speed (same packed
layers as RTN). At 4 bits it recovers much of RTN's loss with less compute than GPTQ; it only
chooses scales and ranges, so it fits the calibration text less closely than GPTQ does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from frugalm.runtime.modules import is_linear, weight_out_in
from frugalm.runtime.quant_linear import dequantize_groups, quantize_groups
from frugalm.techniques._calibrate import BlockStep, calibrate_blocks
from frugalm.techniques.base import Context, Technique
from frugalm.techniques.quant_rtn import (
    ByteCount,
    WeightQuantOptions,
    group_details,
    quant_linear,
    quant_targets,
    record_quant_change,
    replace_module_,
)

CLIP_STEPS = 10
"""Clipping ranges tried: max|w| * (1 - i / 20) for i < 10 (the reference's max_shrink 0.5, 20-point grid)."""
NO_CLIP = ("q_proj", "k_proj")
"""Layers whose clipping the reference skips: their error reaches the output through softmax(QK^T)."""


@dataclass(frozen=True, kw_only=True)
class AWQQuantConfig(WeightQuantOptions):
    bits: Literal[4, 8] = 4
    """Bits per weight: 4 (packed two per byte) or 8. The other shared options: see rtn_quant."""
    grid: int = 20
    """Points of the alpha grid over [0, 1] (0 included: plain RTN)."""
    clip: bool = True
    """Also search each weight group's clipping range (the reference's auto_clip)."""

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.grid < 2:
            problems.append(f"grid must be >= 2 (points of the alpha grid over [0, 1], e.g. 20), got {self.grid}")
        return problems


@dataclass(frozen=True)
class Fold:
    """`layers` (names inside a decoder block) read the output of `prev`, a norm or a linear."""

    prev: str
    layers: tuple[str, ...]
    rows: str = "same"
    """How input channel j of `layers` maps to an output row of a linear `prev`: same, heads, gpt2_v, neox_v."""


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
FOLDS = (
    Fold("input_layernorm", QKV),  # Llama, Qwen2, Mistral
    Fold("self_attn.v_proj", ("self_attn.o_proj",), "heads"),
    Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Fold("mlp.up_proj", ("mlp.down_proj",)),
    Fold("self_attn_layer_norm", QKV),  # OPT
    Fold("self_attn.v_proj", ("self_attn.out_proj",), "heads"),
    Fold("final_layer_norm", ("fc1",)),
    Fold("fc1", ("fc2",)),
    Fold("ln_1", ("attn.c_attn",)),  # GPT-2
    Fold("attn.c_attn", ("attn.c_proj",), "gpt2_v"),
    Fold("ln_2", ("mlp.c_fc",)),
    Fold("input_layernorm", ("attention.query_key_value",)),  # GPT-NeoX
    Fold("attention.query_key_value", ("attention.dense",), "neox_v"),
    Fold("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
)


# --- scale and clip search ----------------------------------------------------------------------


def fake_quant(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """RTN then dequantize: the weight (out, in) the quantized layer computes with."""
    return dequantize_groups(*quantize_groups(w, bits, group_size, symmetric))


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """sum ||X delta^T||^2 / n from delta (out, in) and gram = X^T X / n (in, in)."""
    return float(((delta @ gram) * delta).sum())


def search_scale(
    weights: list[torch.Tensor],
    x_mean: torch.Tensor,
    gram: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: int = 20,
) -> tuple[torch.Tensor, float, float]:
    """Best s (in,) for weights [(out_k, in)] sharing inputs with mean |x| (in,) and Gram (in, in).

    Returns (s, its output error, RTN's output error).
    """
    best_s, best_err, rtn_err = None, float("inf"), None
    for alpha in torch.linspace(0, 1, grid).tolist():
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # (in,)
        err = sum(output_error(w - fake_quant(w * s, bits, group_size, symmetric) / s, gram) for w in weights)
        rtn_err = err if rtn_err is None else rtn_err
        if err < best_err:
            best_s, best_err = s, err
    return best_s, best_err, rtn_err


def clip_search(w: torch.Tensor, gram: torch.Tensor, *, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """w (out, in) clamped per (row, group) to the range minimizing that group's output error."""
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    wg = w.reshape(out_f, in_f // g, g)  # (out, G, g)
    blocks = torch.stack(
        [gram[k : k + g, k : k + g] for k in range(0, in_f, g)]
    )  # (G, g, g): cross-group terms ignored
    max0 = wg.abs().amax(-1, keepdim=True)  # (out, G, 1)
    best_max, best_err = max0, torch.full(wg.shape[:2], float("inf"), device=w.device)
    for i in range(CLIP_STEPS):
        limit = max0 * (1 - i / 20)
        delta = wg - fake_quant(
            torch.clamp(wg, -limit, limit).reshape(out_f, in_f), bits, group_size, symmetric
        ).reshape(wg.shape)
        err = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], limit, best_max)
    return torch.clamp(wg, -best_max, best_max).reshape(out_f, in_f)


# --- folding 1/s into the producer of the input -------------------------------------------------


def _source_rows(fold: Fold, block: nn.Module, prev: nn.Module, n_in: int) -> torch.Tensor | None:
    """(n_in,) output row of linear `prev` feeding each input channel of the folded layers, or None."""
    n_out = weight_out_in(prev).shape[0]
    j = torch.arange(n_in, device=prev.weight.device)
    if fold.rows == "same" or (fold.rows == "heads" and n_out == n_in):
        return j if n_out == n_in else None
    attn = block.get_submodule(fold.layers[0].rpartition(".")[0])
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    if (
        fold.rows == "heads" and head_dim and n_in % n_out == 0
    ):  # grouped-query attention: n_rep query heads per kv head
        n_rep = n_in // n_out
        return (j // head_dim) // n_rep * head_dim + j % head_dim
    if fold.rows == "gpt2_v" and n_out == 3 * n_in:  # c_attn output = [q | k | v]
        return 2 * n_in + j
    if fold.rows == "neox_v" and head_dim and n_out == 3 * n_in:  # per head [q | k | v]
        return (j // head_dim) * 3 * head_dim + 2 * head_dim + j % head_dim
    return None


def _shared_per_row(x_mean: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x_mean (in,) averaged over channels fed by one row, so s is equal wherever a row is shared."""
    if rows is None:
        return x_mean
    n = int(rows.max()) + 1
    sums = torch.zeros(n, dtype=x_mean.dtype, device=x_mean.device).index_add_(0, rows, x_mean)
    counts = torch.zeros(n, dtype=x_mean.dtype, device=x_mean.device).index_add_(0, rows, torch.ones_like(x_mean))
    return (sums / counts.clamp(min=1))[rows]


def _fold_(prev: nn.Module, rows: torch.Tensor | None, layers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide prev's output channels by s and multiply the layers' input columns by s."""
    if rows is None:  # a norm: output channel j is input channel j of the layers
        divisor = s
    else:
        divisor = torch.ones(weight_out_in(prev).shape[0], dtype=s.dtype, device=s.device)
        divisor[rows] = s
    target = prev.weight if rows is None else weight_out_in(prev)  # (in,) or (out_prev, in_prev)
    target.div_((divisor if rows is None else divisor[:, None]).to(target))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(divisor.to(prev.bias))
    for m in layers:
        weight_out_in(m).mul_(s.to(m.weight)[None, :])


def _try_fold_(
    step: BlockStep, fold: Fold, config: AWQQuantConfig, reference: torch.Tensor
) -> tuple[list[str], torch.Tensor] | None:
    """Search s for one fold rule and apply it if the block's output stays the same; (targeted names, s) or None."""
    try:
        prev = step.module.get_submodule(fold.prev)
        layers = [step.module.get_submodule(n) for n in fold.layers]
    except AttributeError:
        return None
    targeted = [f"{step.name}.{n}" for n in fold.layers if f"{step.name}.{n}" in step.stats]
    n_in = weight_out_in(layers[0]).shape[1]
    if not targeted or not all(is_linear(m) and weight_out_in(m).shape[1] == n_in for m in layers):
        return None
    if is_linear(prev):
        rows = _source_rows(fold, step.module, prev, n_in)
        if rows is None:
            return None
    elif getattr(prev, "weight", None) is not None and prev.weight.shape == (n_in,):
        rows = None  # a norm with an elementwise weight
    else:
        return None
    stats = step.stats[targeted[0]]
    if not stats.tokens:
        return None
    x_mean = _shared_per_row(stats.mean_abs.float(), rows)
    gram = (stats.gram / stats.tokens).float()
    weights = [weight_out_in(step.module.get_submodule(n.removeprefix(step.name + "."))).float() for n in targeted]
    s, _, _ = search_scale(
        weights,
        x_mean,
        gram,
        bits=config.bits,
        group_size=config.group_for(weights[0].shape[1]),
        symmetric=config.symmetric,
        grid=config.grid,
    )
    saved = [t.detach().clone() for t in _params(prev, layers)]
    _fold_(prev, rows, layers, s)
    # Exact in real arithmetic: allow only rounding (a wrong fold moves the output by ~|s - 1|).
    tolerance = max(1e-3, 8 * torch.finfo(reference.dtype).eps) * float(reference.abs().max())
    if float((step.run(0) - reference).abs().max()) > tolerance:
        for t, old in zip(_params(prev, layers), saved):
            t.copy_(old)
        return None
    return targeted, s


def _params(prev: nn.Module, layers: list[nn.Module]) -> list[torch.Tensor]:
    return [t for m in (prev, *layers) for t in (m.weight, getattr(m, "bias", None)) if t is not None]


def scale_block_(step: BlockStep, config: AWQQuantConfig) -> dict[str, torch.Tensor]:
    """Apply every fold rule that fits this block; {targeted layer name: its s (in,)}."""
    scales: dict[str, torch.Tensor] = {}
    if not step.batches:  # layers outside the decoder blocks: nothing to fold into
        return scales
    reference = step.run(0)  # (batch, seq, hidden): folds must leave it unchanged
    for fold in FOLDS:
        if any(f"{step.name}.{n}" in scales for n in fold.layers):
            continue
        found = _try_fold_(step, fold, config, reference)
        if found:
            scales.update({name: found[1] for name in found[0]})
    return scales


# --- the technique ------------------------------------------------------------------------------


@torch.no_grad()
def apply(model: nn.Module, config: AWQQuantConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    layers = quant_targets(name, config, model)
    tokens = ctx.calibration_tokens(name)
    count, unscaled = ByteCount(), []
    for step in calibrate_blocks(model, layers, tokens, gram=True):
        scales = scale_block_(step, config)
        for layer_name, module in step.layers:
            w, stats = weight_out_in(module).float().clone(), step.stats[layer_name]  # (out, in), already scaled
            group_size = config.group_for(w.shape[1])
            if config.clip and stats.tokens and not layer_name.endswith(NO_CLIP):
                s = scales.get(layer_name, torch.ones(w.shape[1], device=w.device))
                gram = (stats.gram / stats.tokens).float() / (s[:, None] * s[None, :])  # inputs are now x / s
                w = clip_search(w, gram, bits=config.bits, group_size=group_size, symmetric=config.symmetric)
            if layer_name not in scales:
                unscaled.append(layer_name)
            new = quant_linear(module, *quantize_groups(w, config.bits, group_size, config.symmetric), config.bits)
            count.add(w.numel(), new)
            replace_module_(model, layer_name, new)
            ctx.report(name, count.layers, len(layers))
    details = {k: getattr(config, k) for k in ("bits", "activations", "symmetric", "grid", "clip")}
    details |= group_details(config, layers)
    record_quant_change(
        ctx,
        name,
        [n for n, _ in layers],
        count,
        model,
        calibration_samples=len(tokens),
        unscaled_layers=unscaled,
        **details,
    )
    return model


TECHNIQUE = Technique(
    name="awq_quant", config_cls=AWQQuantConfig, apply=apply, kind="quantization", needs_calibration=True
)
