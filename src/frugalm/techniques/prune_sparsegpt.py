"""SparseGPT: one-shot pruning with weight reconstruction (Frantar & Alistarh 2023, arXiv:2301.00774).

For each targeted Linear W (out, in) with calibration inputs X (tokens, in), prunes to the
requested sparsity while minimising ||X W^T - X W'^T||^2, the layer's output error. It walks the
input columns left to right (Optimal Brain Surgeon, one column at a time for all rows at once):
a pruned weight's error is spread over the not yet visited columns of its row through the
inverse Hessian H^-1 = (X^T X + damp I)^-1, taken as the upper Cholesky factor so every step is
a rank-1 update. Masks are chosen adaptively per block of `blocksize` columns, on the current
(already updated) weights by the OBS saliency w^2 / [H^-1]_jj^2, over the whole block (all rows
together, as the paper's code does); with an N:M pattern, per group of M columns of each row.

Calibration is sequential, as in the paper: decoder blocks are pruned in order; each block's
Gram matrices X^T X (float64, (in, in) per distinct input) are gathered on the outputs of the
already pruned blocks before it (`_calibrate.calibrate_blocks`), so memory holds one block's Grams.
Unlike the reference code, input features that are always zero in the calibration data keep
their weights (the reference zeroes them): on other text they may not be zero.

Does not make dense kernels faster by itself (see `magnitude_prune`). Does not quantize jointly
(the paper's SparseGPT+GPTQ variant). Costs O(in^3) per layer plus a Python loop over columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.modules import weight_out_in
from frugalm.techniques._calibrate import calibrate_blocks, require_inputs
from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.prune_magnitude import (
    PruneOptions,
    parse_pattern,
    prune_mask,
    pruning_targets,
    sparsity_details,
)


@dataclass(frozen=True, kw_only=True)
class SparseGPTPruneConfig(PruneOptions):
    blocksize: int = 128
    """Columns per lazy-update block; the unstructured mask is chosen per block."""
    percdamp: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.blocksize < 1:
            problems.append(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0 < self.percdamp <= 1:
            problems.append(
                f"percdamp must be in (0, 1] (a fraction of the mean Hessian diagonal; 0.01 is usual), got {self.percdamp}"
            )
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not problems and (nm := parse_pattern(self.pattern)) and self.blocksize % nm[1]:
            problems.append(
                f"blocksize {self.blocksize} must be a multiple of M={nm[1]} of pattern '{self.pattern}'; use e.g. 128"
            )
        return problems


def inverse_hessian_factor(gram: torch.Tensor, percdamp: float, layer: str) -> torch.Tensor:
    """Upper Cholesky factor U of (X^T X + damp I)^-1, so that U^T U = H^-1; gram is (in, in) float64."""
    h = gram.clone()
    diag = h.diagonal()  # a view
    diag[diag == 0] = 1.0  # features never active: keep H invertible
    diag.add_(percdamp * diag.mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item():
        raise TechniqueError(
            f"sparsegpt_prune: the Hessian of '{layer}' is not positive definite; raise `percdamp` (now {percdamp}) or use more calibration samples"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def sparsegpt_weights(
    w: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    layer: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned and reconstructed weight (out, in) float32 and its mask (True = zeroed), from w (out, in) and X^T X (in, in)."""
    w = w.detach().float().clone()
    out_f, in_f = w.shape
    hinv = inverse_hessian_factor(gram.double(), percdamp, layer).float()  # (in, in) upper triangular
    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=w.device)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]  # (out, B), (B, B)
        d1 = h1.diagonal()  # (B,)
        mask1 = mask[:, i1:i2]  # a view: filled in place
        if nm is None:
            mask1 |= prune_mask(w1.pow(2) / d1.pow(2)[None, :], sparsity, None, per_row=False)
        err1 = torch.zeros_like(w1)  # (out, B) scaled errors, propagated to later blocks
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                mask1[:, group] |= prune_mask(w1[:, group].pow(2) / d1[group].pow(2)[None, :], 0.0, nm, per_row=True)
            col = w1[:, i]
            pruned = torch.where(mask1[:, i], torch.zeros_like(col), col)  # (out,)
            err = (col - pruned) / d1[i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]  # OBS update of this block's remaining columns
            w1[:, i] = pruned
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # lazy update of the columns after the block
    return w, mask


@torch.no_grad()
def apply(model: nn.Module, config: SparseGPTPruneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    nm, sparsity, layers = pruning_targets(name, config, model)
    tokens = ctx.calibration_tokens(name)  # (n, seq_len) int64
    masks = {}
    for step in calibrate_blocks(model, layers, tokens, gram=True, sequential=True, batch_size=config.batch_size):
        require_inputs(name, step)
        for layer_name, module in step.layers:
            w = weight_out_in(module)  # (out, in), a view
            new_w, masks[layer_name] = sparsegpt_weights(
                w,
                step.stats[layer_name].gram,
                sparsity,
                nm,
                blocksize=config.blocksize,
                percdamp=config.percdamp,
                layer=layer_name,
            )
            w.copy_(new_w.to(w.dtype))
        ctx.report(name, len(masks), len(layers))
    details = sparsity_details(masks, sparsity, config.pattern)
    changed = sum(m.numel() for m in masks.values())  # every weight of a targeted layer may be updated
    record_change(ctx, name, list(masks), changed, model, scope="block", calibration_samples=len(tokens), **details)
    return model


TECHNIQUE = Technique(
    name="sparsegpt_prune", config_cls=SparseGPTPruneConfig, apply=apply, kind="pruning", needs_calibration=True
)
