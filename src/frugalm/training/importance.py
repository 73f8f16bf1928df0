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

`importance_sample` scores once. `ImportanceWindows` is the training-time form, a batch source
for frugalm.training.loop.train (a stage's `sampling: importance`): every `rescore_every` steps
it draws a fresh pool of random windows, scores it with the model being trained (scores go stale
as the model learns) and draws each batch from the pool, without reweighting the loss: online
batch selection (Loshchilov & Hutter), which spends the steps on what the model still gets wrong.
Scoring costs one forward pass per pool window; it pays off when the pool is many times the
batch and the losses differ widely. Its FLOPs are counted and belong to the training cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from frugalm.errors import ConfigError, DataError, problems_message
from frugalm.measure.compute import _EXTRA_FLOP_FORMULAS

_RULES = {
    "pool": (lambda v: v >= 1, "must be >= 1"),
    "score_batch": (lambda v: v >= 1, "must be >= 1"),
    "rescore_every": (lambda v: v >= 1, "must be >= 1"),
    "power": (lambda v: v >= 0, "must be >= 0 (0 samples uniformly)"),
    "uniform_mix": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


def sampling_problems(**settings: tuple[str, float]) -> list[str]:
    """Every bad importance-sampling setting: THE check, used by ImportanceConfig, ImportanceWindows
    and a training stage's `sampling_*` options.

    Each keyword is one setting (pool, score_batch, rescore_every, power, uniform_mix), given as
    (its name where the user wrote it, its value), so the messages name what the user can fix:
    sampling_problems(pool=("sampling_pool", 0)) == ["sampling_pool=0 must be >= 1"].
    """
    return [
        f"{name}={value!r} {rule}"
        for setting, (name, value) in settings.items()
        for ok, rule in [_RULES[setting]]
        if not ok(value)
    ]


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
        return sampling_problems(pool=("num_samples", self.num_samples), score_batch=("batch_size", self.batch_size),
                                 power=("power", self.power), uniform_mix=("uniform_mix", self.uniform_mix))  # fmt: skip


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
        raise DataError(
            f"candidate windows: need a 1-D token stream of at least seq_len + 1 = {seq_len + 1} tokens, "
            f"got shape {tuple(tokens.shape)}; give more text or lower seq_len."
        )
    if stride < 1:
        raise ConfigError(f"candidate windows: stride={stride} must be >= 1")
    return tokens.to(torch.long).unfold(0, seq_len + 1, stride)  # (N, seq_len + 1)


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise DataError(
            f"candidate windows: need a (N >= 1, seq_len + 1 >= 2) tensor of token ids, "
            f"got shape {tuple(windows.shape)}; build them with candidate_windows()."
        )


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
        raise ConfigError(problems_message("ImportanceConfig", problems))
    losses = window_losses(model, windows, config.batch_size)
    probs = sampling_probs(losses, config.power, config.uniform_mix)
    generator = torch.Generator().manual_seed(config.seed)
    indices = torch.multinomial(probs, config.num_samples, replacement=True, generator=generator)
    weights = 1.0 / (probs.numel() * probs[indices])  # (num_samples,)
    return ImportanceSample(indices=indices, weights=weights, probs=probs, losses=losses)


class ImportanceWindows:
    """A batch source for frugalm.training.loop.train that draws windows by loss from a rescored pool.

    At every micro-batch index that starts a rescoring period (and at the first call), it draws
    `pool` window starts uniformly from `tokens` with the loop's generator, scores the windows
    with `model` (mean next-token NLL, eval mode, no gradient) and sets p as `sampling_probs`.
    Each call then draws a global batch of batch_size * world_size pool rows from p with the same
    generator and returns this rank's slice, so data-parallel ranks score the same pool (their
    weights are equal) and stay in step. Everything it draws comes from the loop's generator,
    which checkpoints hold, so a run resumed at a rescoring step continues exactly; a resume
    elsewhere would score a different model than the uninterrupted run did, and is refused.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, *, batch_size: int, seq_len: int, pool: int, power: float,
                 uniform_mix: float, rescore_every: int, grad_accum: int = 1, rank: int = 0, world_size: int = 1, score_batch: int = 16):  # fmt: skip
        if tokens.dim() != 1 or tokens.numel() < seq_len + 1:
            raise DataError(
                f"importance sampling: need a 1-D token stream of at least seq_len + 1 = {seq_len + 1} tokens, got shape {tuple(tokens.shape)}; give more text or lower seq_len."
            )
        problems = sampling_problems(pool=("pool", pool), score_batch=("score_batch", score_batch), power=("power", power),
                                     uniform_mix=("uniform_mix", uniform_mix), rescore_every=("rescore_every", rescore_every))  # fmt: skip
        if problems:
            raise ConfigError(problems_message("importance sampling", problems))
        self.model, self.tokens = model, tokens.to(torch.long)
        self.batch_size, self.seq_len, self.pool_size = batch_size, seq_len, pool
        self.power, self.uniform_mix, self.score_batch = power, uniform_mix, score_batch
        self.period = rescore_every * grad_accum  # micro-batches between rescorings
        self.rank, self.world_size = rank, world_size
        self.pool: torch.Tensor | None = None  # (pool, seq_len + 1)
        self.probs: torch.Tensor | None = None  # (pool,)
        self.losses: torch.Tensor | None = None  # (pool,)
        self.rescores, self.flops_per_window = 0, None
        self.pool_mean_losses: list[float] = []  # mean pool loss at each rescoring
        self.drawn_loss_sum, self.drawn = 0.0, 0

    def __call__(self, index: int, generator: torch.Generator) -> torch.Tensor:
        if index % self.period == 0:
            self._rescore(generator)
        elif self.probs is None:
            raise ConfigError(f"importance sampling: a run resumed at micro-batch {index}, between rescorings (every {self.period}); "
                              "make checkpoint_every a multiple of rescore_every so that resumes continue exactly")  # fmt: skip
        rows = torch.multinomial(self.probs, self.batch_size * self.world_size, replacement=True, generator=generator)
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.drawn_loss_sum += float(self.losses[mine].sum())
        self.drawn += mine.numel()
        return self.pool[mine]  # (batch, seq_len + 1)

    def _rescore(self, generator: torch.Generator) -> None:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.pool_size,), generator=generator)
        self.pool = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)]  # (pool, seq_len + 1)
        if self.flops_per_window is None:
            self.flops_per_window = _scoring_flops_per_window(self.model, self.seq_len)
        self.losses = window_losses(self.model, self.pool, self.score_batch)
        self.probs = sampling_probs(self.losses, self.power, self.uniform_mix)
        self.rescores += 1
        self.pool_mean_losses.append(float(self.losses.mean()))

    @property
    def scored_tokens(self) -> int:
        return self.rescores * self.pool_size * self.seq_len

    def summary(self) -> dict:
        """What the selection did and cost, for the stage's change record."""
        scored = self.rescores * self.pool_size
        return {
            "method": "importance (loss-proportional online batch selection, loss not reweighted)",
            "pool_windows": self.pool_size, "power": self.power, "uniform_mix": self.uniform_mix,
            "rescore_every_micro_batches": self.period, "rescores": self.rescores, "scored_windows": scored,
            "scored_tokens": self.scored_tokens, "scoring_flops": (self.flops_per_window or 0) * scored,
            "scoring_flops_method": "counted: torch FlopCounterMode over one window's forward x windows scored",
            "pool_mean_loss_nats": self.pool_mean_losses, "drawn_mean_loss_nats": self.drawn_loss_sum / max(1, self.drawn),
        }  # fmt: skip


def _scoring_flops_per_window(model: nn.Module, seq_len: int) -> int:
    """Counted FLOPs of one window's scoring forward (a probe of token 0: FLOPs do not depend on the values)."""

    device = next(model.parameters()).device
    probe = torch.zeros(1, seq_len + 1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        window_losses(model, probe, 1)
    return counter.get_total_flops()


def weighted_lm_loss(model: nn.Module, windows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over windows of weight_i * (mean next-token NLL of window i): with importance weights,
    an unbiased estimate of the uniform mean loss over the candidate pool. Differentiable."""
    _check_windows(windows)
    if weights.shape != windows.shape[:1]:
        raise DataError(
            f"weighted loss: weights of shape {tuple(weights.shape)} do not match {windows.shape[0]} windows; pass one weight per window"
        )
    device = next(model.parameters()).device
    windows = windows.to(device)
    logits = model(input_ids=windows[:, :-1]).logits  # (batch, seq_len, vocab)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), windows[:, 1:], reduction="none").mean(dim=1)  # (batch,)
    return (weights.to(device, nll.dtype) * nll).mean()
