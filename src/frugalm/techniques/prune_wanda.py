"""Wanda: pruning by weights and activations (Sun et al. 2023, arXiv:2306.11695).

Scores each weight by |W_ij| * ||X_j||_2, where ||X_j|| is the L2 norm of input feature j over
the calibration tokens, and zeroes the lowest-scoring `sparsity` of every output row (or, with
`pattern: "2:4"`, the M-N lowest of every M consecutive inputs of a row). The activation term
keeps the weights that multiply the few large-magnitude input features of LLMs, which pure
magnitude pruning removes. No weight update, no second-order information: one pass, cheap.

Calibration is sequential by default, as in the paper's code: the decoder blocks are pruned in
order, and each block's input norms are measured on the outputs of the already pruned blocks
before it (`_calibrate.calibrate_blocks`). `sequential: false` measures every layer on the dense
model's activations (the unpruned blocks' outputs feed the next block; slightly worse).

Does not make dense kernels faster by itself (see `magnitude_prune`); does not reconstruct the
remaining weights (that is SparseGPT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frugalm.runtime.modules import weight_out_in
from frugalm.techniques._calibrate import calibrate_blocks, require_inputs
from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.prune_magnitude import (
    PruneOptions,
    prune_mask,
    pruning_targets,
    sparsity_details,
    zero_masked_,
)


@dataclass(frozen=True, kw_only=True)
class WandaPruneConfig(PruneOptions):
    sequential: bool = True
    """Measure each block's inputs after pruning the blocks before it (the paper's code); false: one pass on the dense model."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def problems(self) -> list[str]:
        extra = [f"batch_size must be >= 1, got {self.batch_size}"] if self.batch_size < 1 else []
        return super().problems() + extra


def wanda_mask(
    w: torch.Tensor, feature_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> torch.Tensor:
    """True where w (out, in) is zeroed: lowest |w_ij| * ||x_j|| per row; feature_norm is (in,)."""
    scores = w.abs().float() * feature_norm.float()[None, :]  # (out, in)
    return prune_mask(scores, sparsity, nm, per_row=True)


# --- the technique ------------------------------------------------------------------------------


@torch.no_grad()
def apply(model: nn.Module, config: WandaPruneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    nm, sparsity, layers = pruning_targets(name, config, model)
    tokens = ctx.calibration_tokens(name)  # (n, seq_len) int64
    masks = {}
    for step in calibrate_blocks(
        model, layers, tokens, gram=False, sequential=config.sequential, batch_size=config.batch_size
    ):
        require_inputs(name, step)
        for layer_name, module in step.layers:
            masks[layer_name] = wanda_mask(weight_out_in(module), step.stats[layer_name].feature_norm, sparsity, nm)
            zero_masked_(module, masks[layer_name])
        ctx.report(name, len(masks), len(layers))
    details = sparsity_details(masks, sparsity, config.pattern)
    record_change(
        ctx,
        name,
        list(masks),
        details["weights_zeroed"],
        model,
        scope="row",
        sequential=config.sequential,
        calibration_samples=len(tokens),
        **details,
    )
    return model


TECHNIQUE = Technique(
    name="wanda_prune", config_cls=WandaPruneConfig, apply=apply, kind="pruning", needs_calibration=True
)
