"""Importance sampling of training windows by loss (Katharopoulos & Fleuret 2018, arXiv:1803.00942;
Loshchilov & Hutter 2015, arXiv:1511.06343).

Scores every candidate window with the current model (mean next-token NLL per window, no
gradient), then draws windows with replacement with probability

    p_i = (1 - uniform_mix) * loss_i**power / sum_j loss_j**power + uniform_mix / N

`power` tempers the preference: 0 is uniform sampling, 1 is proportional to the loss, larger
values concentrate on the hardest windows. The uniform part keeps every p_i >= uniform_mix / N,
which bounds the importance weights by 1 / uniform_mix.

The estimator: each drawn window carries the weight w_i = 1 / (N p_i). Then
E_p[w_i * loss_i] = sum_i p_i * loss_i / (N p_i) = mean_i loss_i, so the weighted mean loss of a
sample (`weighted_lm_loss`) and its gradient are unbiased estimates of the uniform mean over all
N candidates, with lower variance than uniform sampling when p tracks the per-window gradient
size. Training on the drawn windows without the weights instead optimises a loss tilted toward
hard windows (the "focus on hard examples" use).

It does not rescore during training by itself: scores go stale as the model learns, so callers
rescore every few hundred steps. Scoring costs one forward pass per candidate window; it pays off
when the candidate pool is many times the sampled batch and the losses differ widely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import ConfigError, DataError


@dataclass(frozen=True, kw_only=True)
class ImportanceConfig:
    num_samples: int = 64
    """Windows drawn (with replacement)."""
    power: float = 1.0
    """Tempering exponent on the loss, >= 0 (0 = uniform)."""
    uniform_mix: float = 0.1
    """Share of probability spread uniformly, in [0, 1]; bounds the weights by 1 / uniform_mix."""
    batch_size: int = 16
    """Windows scored per forward pass."""
    seed: int = 0
    """Seeds the draw."""

    def problems(self) -> list[str]:
        out = [f"{name}={getattr(self, name)!r} must be >= 1" for name in ("num_samples", "batch_size") if getattr(self, name) < 1]
        if not self.power >= 0:
            out.append(f"power={self.power!r} must be >= 0 (0 samples uniformly)")
        if not 0 <= self.uniform_mix <= 1:
            out.append(f"uniform_mix={self.uniform_mix!r} must be in [0, 1]")
        return out


@dataclass(frozen=True)
class ImportanceSample:
    indices: torch.Tensor
    """(num_samples,) int64: drawn rows of the candidate windows."""
    weights: torch.Tensor
    """(num_samples,) float64: 1 / (N p_i) of each drawn window, the unbiased reweighting."""
    probs: torch.Tensor
    """(N,) float64: sampling probability of every candidate."""
    losses: torch.Tensor
    """(N,) float64: mean next-token NLL (nats) of every candidate under the scoring model."""

    def to_dict(self) -> dict:
        return {name: getattr(self, name).tolist() for name in ("indices", "weights", "probs", "losses")}


def candidate_windows(tokens: torch.Tensor, seq_len: int, stride: int | None = None) -> torch.Tensor:
    """(N, seq_len + 1) windows of a 1-D token stream, every `stride` tokens (default seq_len: no overlap of targets)."""
    stride = stride or seq_len
    if tokens.dim() != 1 or tokens.numel() < seq_len + 1:
        raise DataError(f"candidate windows: need a 1-D token stream of at least seq_len + 1 = {seq_len + 1} tokens, "
                        f"got shape {tuple(tokens.shape)}; give more text or lower seq_len.")
    if stride < 1:
        raise ConfigError(f"candidate windows: stride={stride} must be >= 1")
    return tokens.to(torch.long).unfold(0, seq_len + 1, stride)  # (N, seq_len + 1)


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise DataError(f"candidate windows: need a (N >= 1, seq_len + 1 >= 2) tensor of token ids, "
                        f"got shape {tuple(windows.shape)}; build them with candidate_windows().")


@torch.no_grad()
def window_losses(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(N,) mean next-token NLL (nats) of each (seq_len + 1)-token window, on the model's device."""
    _check_windows(windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk[:, :-1]).logits  # (batch, seq_len, vocab)
        nll = F.cross_entropy(logits.transpose(1, 2).float(), chunk[:, 1:], reduction="none")  # (batch, seq_len)
        out.append(nll.mean(dim=1).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def sampling_probs(losses: torch.Tensor, power: float, uniform_mix: float) -> torch.Tensor:
    """(N,) probabilities (1 - mix) * loss**power / sum + mix / N; uniform where all scores are 0."""
    if losses.dim() != 1 or losses.numel() == 0 or not torch.isfinite(losses).all() or (losses < 0).any():
        raise DataError("importance sampling: losses must be a non-empty 1-D tensor of finite values >= 0")
    n = losses.numel()
    scores = losses.double() ** power
    total = scores.sum()
    tilted = scores / total if total > 0 else torch.full_like(scores, 1 / n)
    return (1 - uniform_mix) * tilted + uniform_mix / n


def importance_sample(model: nn.Module, windows: torch.Tensor, config: ImportanceConfig) -> ImportanceSample:
    """Score every candidate window with `model`, then draw config.num_samples with p ∝ tempered loss."""
    if problems := config.problems():
        raise ConfigError(f"ImportanceConfig: {'; '.join(problems)}. Fix these options.")
    losses = window_losses(model, windows, config.batch_size)
    probs = sampling_probs(losses, config.power, config.uniform_mix)
    generator = torch.Generator().manual_seed(config.seed)
    indices = torch.multinomial(probs, config.num_samples, replacement=True, generator=generator)
    weights = 1.0 / (probs.numel() * probs[indices])  # (num_samples,)
    return ImportanceSample(indices=indices, weights=weights, probs=probs, losses=losses)


def weighted_lm_loss(model: nn.Module, windows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over windows of weight_i * (mean next-token NLL of window i): with importance weights,
    an unbiased estimate of the uniform mean loss over the candidate pool. Differentiable."""
    _check_windows(windows)
    if weights.shape != windows.shape[:1]:
        raise DataError(f"weighted loss: weights of shape {tuple(weights.shape)} do not match {windows.shape[0]} windows; pass one weight per window")
    device = next(model.parameters()).device
    windows = windows.to(device)
    logits = model(input_ids=windows[:, :-1]).logits  # (batch, seq_len, vocab)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), windows[:, 1:], reduction="none").mean(dim=1)  # (batch,)
    return (weights.to(device, nll.dtype) * nll).mean()
