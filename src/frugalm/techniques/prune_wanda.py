"""Wanda: pruning by weights and activations (Sun et al. 2023, arXiv:2306.11695).

Scores each weight by |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input feature j over
the calibration tokens, and zeroes the lowest-scoring `sparsity` of every output row (or, with
`pattern: "2:4"`, the M-N lowest of every M consecutive inputs of a row). The activation term
keeps the weights that multiply the few large-magnitude input features of LLMs, which pure
magnitude pruning removes. No weight update, no second-order information: one pass, cheap.

Calibration is sequential by default, as in the paper's code: the decoder blocks are pruned in
order, and each block's input norms are measured on the outputs of the already pruned blocks
before it (a forward pass that stops at the block). `sequential: false` measures every layer
once on the dense model (one forward pass over the calibration set, cheaper, slightly worse).

Does not make dense kernels faster by itself (see `magnitude_prune`); does not reconstruct the
remaining weights (that is SparseGPT).

The block-wise calibration helpers here are shared with `prune_sparsegpt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.modules import weight_out_in
from frugalm.techniques._calibrate import InputStats, collect_input_stats
from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.prune_magnitude import (
    DEFAULT_TARGETS,
    pattern_problems,
    prune_mask,
    pruning_targets,
    sparsity_details,
    zero_masked_,
)


@dataclass(frozen=True, kw_only=True)
class WandaPruneConfig:
    sparsity: float = 0.5
    """Fraction of weights zeroed in each output row of each targeted layer, in [0, 1); ignored with an N:M pattern."""
    pattern: str = "unstructured"
    """"unstructured", or "N:M" (e.g. "2:4"): in every M consecutive input weights of a row keep the N best."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """fnmatch patterns over module names; the output head is excluded unless named."""
    sequential: bool = True
    """Measure each block's inputs after pruning the blocks before it (the paper's code); false: one pass on the dense model."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def problems(self) -> list[str]:
        extra = [f"batch_size must be >= 1, got {self.batch_size}"] if self.batch_size < 1 else []
        return pattern_problems(self.sparsity, self.pattern) + extra


def wanda_mask(w: torch.Tensor, feature_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """True where w (out, in) is zeroed: lowest |w_ij| * ||x_j|| per row; feature_norm is (in,)."""
    scores = w.abs().float() * feature_norm.float()[None, :]  # (out, in)
    return prune_mask(scores, sparsity, nm, per_row=True)


# --- block-wise calibration (shared with SparseGPT) ----------------------------------------------

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"


def group_by_block(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module | None, list[tuple[str, nn.Module]]]]:
    """Targeted layers grouped by the first numbered module above them (the decoder block), in model order.

    Layers outside any numbered block form a group with block None (calibrated by a full pass).
    """
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in layers:  # named_modules order = the order blocks run in
        match = _BLOCK.match(name)
        groups.setdefault(match.group(1) if match else "", []).append((name, module))
    return [(model.get_submodule(prefix) if prefix else None, group) for prefix, group in groups.items()]


class _StopForward(Exception):
    """Raised by a hook once the block of interest has run: the rest of the model is not needed."""


def _stop(module, args, output):
    raise _StopForward


@torch.no_grad()
def block_input_stats(model: nn.Module, block: nn.Module | None, layers: list[tuple[str, nn.Module]], tokens: torch.Tensor, *, gram: bool, batch_size: int = 8) -> dict[str, InputStats]:
    """Input statistics of `layers` (all inside `block`) over `tokens` (n, seq_len), running the model only up to `block`."""
    stats = {name: InputStats(want_gram=gram) for name, _ in layers}
    handles = [module.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0])) for name, module in layers]
    if block is not None:
        handles.append(block.register_forward_hook(_stop))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(tokens), batch_size):
            try:
                model(tokens[i : i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def calibrated_groups(model: nn.Module, layers, tokens: torch.Tensor, *, sequential: bool, gram: bool, batch_size: int):
    """Yield (layers of one block, their input stats); with `sequential`, stats are taken just before the block is pruned.

    The caller prunes each group before asking for the next, so later blocks see pruned inputs.
    """
    if not sequential:
        yield layers, _checked(collect_input_stats(model, layers, tokens, gram=gram, batch_size=batch_size))
        return
    for block, group in group_by_block(model, layers):
        yield group, _checked(block_input_stats(model, block, group, tokens, gram=gram, batch_size=batch_size))


def _checked(stats: dict[str, InputStats]) -> dict[str, InputStats]:
    unseen = [name for name, s in stats.items() if s.tokens == 0]
    if unseen:
        raise TechniqueError(f"layers {unseen[:3]} received no input during calibration (not used in the forward pass?); leave them out of `targets`")
    return stats


# --- the technique ------------------------------------------------------------------------------


@torch.no_grad()
def apply(model: nn.Module, config: WandaPruneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    nm, sparsity, layers = pruning_targets(name, config, model)
    tokens = ctx.calibration_tokens(name)  # (n, seq_len) int64
    masks = {}
    for group, stats in calibrated_groups(model, layers, tokens, sequential=config.sequential, gram=False, batch_size=config.batch_size):
        for layer_name, module in group:
            masks[layer_name] = wanda_mask(weight_out_in(module), stats[layer_name].feature_norm, sparsity, nm)
            zero_masked_(module, masks[layer_name])
        ctx.report(name, len(masks), len(layers))
    details = sparsity_details(masks, sparsity, config.pattern)
    record_change(ctx, name, list(masks), details["weights_zeroed"], model, scope="row", sequential=config.sequential, calibration_samples=len(tokens), **details)
    return model


TECHNIQUE = Technique(name="wanda_prune", config_cls=WandaPruneConfig, apply=apply, kind="pruning", needs_calibration=True)
