"""Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections", arXiv:1506.02626).

Zeroes the smallest-|w| weights of each targeted Linear: `sparsity` of the whole layer
(unstructured, one threshold per layer, as in the paper), or in every group of M consecutive
input weights of a row keeps the N largest (`pattern: "2:4"`, the semi-structured sparsity that
NVIDIA Ampere+ sparse tensor cores run up to ~2x faster on the matmuls). Needs no calibration data.

Does not make dense kernels faster or the saved model smaller by itself: the zeros are stored
as zeros. It helps only with a sparse storage format or kernel, or as the baseline that Wanda
and SparseGPT are measured against. Without fine-tuning, quality drops fast past ~30-50%.

The pattern and mask helpers here are shared by `prune_wanda` and `prune_sparsegpt`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.modules import weight_out_in
from frugalm.techniques._arch import DEFAULT_TARGETS
from frugalm.techniques.base import Context, Technique, record_change, select_linears


@dataclass(frozen=True, kw_only=True)
class PruneOptions:
    """The options every unstructured / N:M pruning technique shares (magnitude, wanda, sparsegpt)."""

    sparsity: float = 0.5
    """Fraction of weights zeroed in each targeted layer (Wanda: in each output row), in [0, 1); ignored with an N:M pattern (which zeroes (M-N)/M)."""
    pattern: str = "unstructured"
    """"unstructured", or "N:M" (e.g. "2:4"): in every M consecutive input weights of a row keep the N largest."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """fnmatch patterns over module names; the output head is excluded unless named."""

    def problems(self) -> list[str]:
        return pattern_problems(self.sparsity, self.pattern)


@dataclass(frozen=True, kw_only=True)
class MagnitudePruneConfig(PruneOptions):
    """Magnitude pruning takes the shared options only."""


# --- shared by the pruning techniques ---------------------------------------------------------


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (n_keep, m) for "N:M"; ValueError for anything else."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if not (sep and n.strip().isdigit() and m.strip().isdigit()) or not 0 < int(n) < int(m):
        raise ValueError(pattern)
    return int(n), int(m)


def pattern_problems(sparsity: float, pattern: str) -> list[str]:
    problems = []
    if not 0 <= sparsity < 1:
        problems.append(f"sparsity must be in [0, 1) (the fraction of weights zeroed), got {sparsity}")
    try:
        parse_pattern(pattern)
    except ValueError:
        problems.append(
            f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4': keep 2 of every 4), got {pattern!r}"
        )
    return problems


def effective_sparsity(sparsity: float, nm: tuple[int, int] | None) -> float:
    return sparsity if nm is None else 1 - nm[0] / nm[1]


def check_groups(technique: str, layers: list[tuple[str, nn.Module]], nm: tuple[int, int] | None) -> None:
    """An N:M pattern needs M to divide every targeted layer's in_features; name the first that does not."""
    if nm is None:
        return
    for name, module in layers:
        in_features = weight_out_in(module).shape[1]
        if in_features % nm[1]:
            fit = next((m for m in (8, 4, 2) if in_features % m == 0), None)  # an example that fits this layer
            fix = (
                f"use an M that divides it (e.g. '{fit // 2}:{fit}') or narrow `targets`" if fit else "narrow `targets`"
            )
            raise TechniqueError(
                f"{technique}: pattern '{nm[0]}:{nm[1]}' needs M={nm[1]} to divide in_features, but layer '{name}' has {in_features}; {fix}"
            )


def prune_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, *, per_row: bool) -> torch.Tensor:
    """Boolean mask (out, in), True where a weight is zeroed: the lowest `scores` (out, in).

    Exact counts (ties broken by index): round(sparsity * in) per row when `per_row`, else
    round(sparsity * out * in) over the whole layer; with N:M, M - N per group of M inputs.
    """
    out_f, in_f = scores.shape
    mask = torch.zeros(
        out_f, in_f, dtype=torch.bool, device=scores.device
    )  # contiguous, even for Conv1D's transposed view
    if nm is not None:
        n, m = nm
        groups = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        return mask.reshape(out_f, in_f // m, m).scatter_(-1, drop, True).reshape(out_f, in_f)
    if per_row:
        k = round(sparsity * in_f)
        return mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True) if k else mask
    k = round(sparsity * scores.numel())
    flat = mask.view(-1)
    if k:
        flat[scores.reshape(-1).topk(k, largest=False).indices] = True
    return mask


def sparsity_details(masks: dict[str, torch.Tensor], sparsity: float, pattern: str) -> dict:
    """Requested and achieved sparsity over the targeted layers (overall, and the per-layer extremes)."""
    per_layer = [float(m.float().mean()) for m in masks.values()]
    zeroed = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "pattern": pattern,
        "sparsity_requested": sparsity,
        "sparsity_achieved": zeroed / total,
        "sparsity_layer_min": min(per_layer),
        "sparsity_layer_max": max(per_layer),
        "weights_zeroed": zeroed,
    }


def pruning_targets(name: str, config, model: nn.Module) -> tuple:
    """The shared start of every unstructured pruning stage: (N:M pattern or None, sparsity, layers)."""
    nm = parse_pattern(config.pattern)
    layers = select_linears(model, config.targets, technique=name)
    check_groups(name, layers, nm)
    return nm, effective_sparsity(config.sparsity, nm), layers


def zero_masked_(module: nn.Module, mask: torch.Tensor) -> None:
    weight_out_in(module).masked_fill_(mask, 0.0)  # a view: writes through Conv1D's (in, out) storage


# --- the technique ------------------------------------------------------------------------------


@torch.no_grad()
def apply(model: nn.Module, config: MagnitudePruneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    nm, sparsity, layers = pruning_targets(name, config, model)
    masks = {}
    for i, (layer_name, module) in enumerate(layers):
        w = weight_out_in(module)  # (out, in)
        masks[layer_name] = prune_mask(w.abs().float(), sparsity, nm, per_row=False)
        zero_masked_(module, masks[layer_name])
        ctx.report(name, i + 1, len(layers))
    details = sparsity_details(masks, sparsity, config.pattern)
    record_change(ctx, name, list(masks), details["weights_zeroed"], model, scope="layer", **details)
    return model


TECHNIQUE = Technique(
    name="magnitude_prune", config_cls=MagnitudePruneConfig, apply=apply, kind="pruning", needs_calibration=False
)
