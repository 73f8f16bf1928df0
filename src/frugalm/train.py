"""A small causal-LM training loop: AdamW, linear warm-up then cosine decay, gradient clipping.

Written to be read and extended (distillation, LoRA and data-parallel training build on it), in
the spirit of nanoGPT's train.py: one function, no trainer class, no callbacks beyond progress.
Training windows are sampled uniformly at random from one 1-D token stream with a seeded
generator, so on CPU two runs with the same seed, model initialisation and thread count give
bitwise-identical weights. It does not do mixed precision, gradient accumulation or evaluation;
callers measure held-out quality themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import ConfigError, DataError

BatchFn = Callable[[int, torch.Generator], torch.Tensor]
"""(step, generator) -> int64 tensor (batch, seq_len + 1): inputs are [:, :-1], targets [:, 1:]."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Windows per step."""
    seq_len: int = 512
    """Tokens per window (the model sees seq_len inputs and predicts seq_len targets)."""
    lr: float = 3e-3
    """Peak learning rate, reached after warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decays from lr to lr * min_lr_ratio at the last step."""
    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms or biases)."""
    grad_clip: float = 1.0
    """Maximum global gradient L2 norm; 0 disables clipping."""
    seed: int = 0
    """Seeds window sampling (and torch's global RNG, for any dropout)."""
    log_every: int = 50
    """Record the mean training loss every this many steps (and at the last step)."""


@dataclass(frozen=True)
class TrainResult:
    losses: list[tuple[int, float]]
    """(step, mean training loss over the steps since the previous record), step is 1-based."""
    final_loss: float
    """The last recorded mean training loss, nats per token."""
    tokens_seen: int
    """Target tokens processed: steps * batch_size * seq_len."""
    wall_time_s: float


def check_config(config: TrainConfig) -> None:
    """Raise one ConfigError listing every bad field."""
    problems = [
        f"{name}={getattr(config, name)!r} must be >= {low}"
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("log_every", 1),
                          ("warmup_steps", 0), ("weight_decay", 0), ("grad_clip", 0))
        if getattr(config, name) < low
    ]
    if not config.lr > 0:
        problems.append(f"lr={config.lr!r} must be > 0")
    if not 0 <= config.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio={config.min_lr_ratio!r} must be in [0, 1]")
    if problems:
        raise ConfigError(f"TrainConfig: {'; '.join(problems)}. Fix these fields.")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warm-up to lr, then cosine down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int) -> BatchFn:
    """Sample `batch_size` windows of seq_len + 1 tokens uniformly from a 1-D token stream."""
    if tokens.dim() != 1 or tokens.numel() < seq_len + 1:
        raise DataError(
            f"training tokens: need a 1-D tensor of at least seq_len + 1 = {seq_len + 1} tokens, "
            f"got shape {tuple(tokens.shape)}; give more text or lower seq_len."
        )
    tokens = tokens.to(torch.long)
    offsets = torch.arange(seq_len + 1)  # (seq_len + 1,)

    def batch(step: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
        return tokens[starts[:, None] + offsets]  # (batch, seq_len + 1)

    return batch


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear and embedding weights) only, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # foreach=False: one simple per-parameter update whose result does not depend on batching.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def causal_lm_loss(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over a (batch, seq_len + 1) window of token ids."""
    inputs, targets = window[:, :-1], window[:, 1:]  # (batch, seq_len) each
    logits = model(input_ids=inputs).logits  # (batch, seq_len, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train_causal_lm(
    model: nn.Module,
    data: torch.Tensor | BatchFn,
    config: TrainConfig,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train `model` in place on `data` (a 1-D token stream, or a BatchFn) and return the loss curve.

    The model's device is used; windows are moved to it. `progress` receives one line per record.
    """
    check_config(config)
    batches = random_windows(data, config.batch_size, config.seq_len) if isinstance(data, torch.Tensor) else data
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    model.train()
    losses: list[tuple[int, float]] = []
    window_sum, window_steps = 0.0, 0
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = causal_lm_loss(model, batches(step, generator).to(device))
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at step {step + 1} (loss {loss.item()}); lower lr={config.lr}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        window_sum, window_steps = window_sum + loss.item(), window_steps + 1
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            losses.append((step + 1, window_sum / window_steps))
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(f"step {step + 1}/{config.steps}  loss {losses[-1][1]:.4f}  "
                         f"lr {lr_at(step, config):.2e}  {elapsed:.0f}s")
            window_sum, window_steps = 0.0, 0
    model.eval()
    return TrainResult(
        losses=losses,
        final_loss=losses[-1][1],
        tokens_seen=config.steps * config.batch_size * config.seq_len,
        wall_time_s=time.perf_counter() - start,
    )
