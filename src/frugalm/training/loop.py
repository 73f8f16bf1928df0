"""The one training loop: AdamW, warm-up then cosine decay, clipping, accumulation, checkpoints.

Written to be read and extended, in the spirit of nanoGPT's train.py: one function, no trainer
class. Every training stage (distillation, LoRA, masked and full fine-tuning) runs it with its
own loss function; the default model is trained by it too.

Determinism: training windows are drawn uniformly at random from one 1-D token stream with a
seeded generator, so on CPU two runs with the same seed, initialisation and thread count give
bitwise-identical weights. Checkpoints hold the model, the optimizer, the step and every random
state, so a run killed midway and resumed ends bitwise equal to an uninterrupted one (the
learning-rate schedule is a pure function of the step and needs no state).

Options beyond plain fp32 training: gradient accumulation (`grad_accum` micro-batches per
step), gradient checkpointing (activations recomputed in the backward pass: less memory, about
a third more compute), bf16 autocast (`precision: bf16`; weights and optimizer stay fp32).

Data parallelism: the loop takes `wrap_model` (e.g. a DistributedDataParallel constructor, which
all-reduces gradients in backward) and reads rank and world size from torch.distributed when a
process group is up. Every rank draws the same global batch of batch_size * world_size windows
from the same generator and keeps its own slice, so N ranks see exactly the windows one process
would with N times the batch, all ranks' random states stay equal, and rank 0 alone writes
checkpoints that every rank can resume from.

Options: `LoopOptions` declares every option a user sets (a recipe's training stage exposes
them under the same names); `TrainConfig` adds where the checkpoints go.

Cost record: frugalm.training.accounting keeps the run's account (wall time, FLOPs, tokens,
energy, losses) across resumes and writes the TrainResult.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import ConfigError, DataError, problems_message
from frugalm.measure.cost import get_profile
from frugalm.measure.energy import EnergyMeter
from frugalm.training import checkpoint as ckpt
from frugalm.training.accounting import RunAccount, TrainResult, count_step_flops

if TYPE_CHECKING:
    from frugalm.measure.cost import HardwareProfile

BatchFn = Callable[[int, torch.Generator], torch.Tensor]
"""(micro-batch index, generator) -> int64 tensor (batch, seq_len + 1): inputs [:, :-1], targets [:, 1:]."""
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""(model, window (batch, seq_len + 1)) -> scalar loss to minimise."""
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """Every option of the loop a user chooses: each declared once here, with its type, doc and default.

    The defaults suit pre-training a small model from scratch; a recipe's training stages
    (frugalm.techniques.training_stage.TrainingOptions) take these same options and state where
    they default otherwise, and why.
    """

    steps: int = 1000
    """Optimizer steps (the training budget)."""
    batch_size: int = 16
    """Windows per micro-batch (per process in data-parallel training)."""
    seq_len: int = 512
    """Tokens per window: the model sees seq_len inputs and predicts seq_len targets (a training stage caps it at the model's context)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = 3e-3
    """Peak learning rate, reached after linear warm-up; cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr: the cosine decays from lr to lr * min_lr_ratio at the last step."""
    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms or biases)."""
    grad_clip: float = 1.0
    """Maximum global gradient L2 norm; 0 disables clipping."""
    seed: int = 0
    """Seeds window sampling and torch's global RNG (dropout, random initialisation of adapters)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast for the forward pass (weights, gradients and optimizer state stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, ~1/3 more compute)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: never); a rerun resumes from the last one."""
    log_every: int = 50
    """Record the mean training loss every this many steps (and at the last step)."""

    def problems(self) -> list[str]:
        """Every bad option, named as the user wrote it."""
        problems = [
            f"{name}={getattr(self, name)!r} must be >= {low}"
            for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("log_every", 1), ("grad_accum", 1),
                              ("warmup_steps", 0), ("weight_decay", 0), ("grad_clip", 0), ("checkpoint_every", 0))
            if getattr(self, name) < low
        ]  # fmt: skip
        if self.steps == 0:
            problems[0] = (
                "steps=0 must be >= 1 (a budget of zero steps trains nothing; give steps >= 1 or remove the stage)"
            )
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        return problems


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopOptions):
    """The loop's options and where the run keeps its checkpoints."""

    checkpoint_dir: str | None = None
    """Folder of the checkpoints; a run started with a checkpoint there resumes from it, and deletes them when it completes."""


def check_config(config: TrainConfig) -> None:
    """Raise one ConfigError listing every bad field."""
    if problems := config.problems():
        raise ConfigError(problems_message("TrainConfig", problems))


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warm-up to lr, then cosine down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def random_windows(
    tokens: torch.Tensor, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1
) -> BatchFn:
    """Sample windows of seq_len + 1 tokens uniformly from a 1-D token stream.

    Each call draws a global batch of batch_size * world_size windows and returns this rank's
    slice of batch_size, so every rank's generator advances identically.
    """
    if tokens.dim() != 1 or tokens.numel() < seq_len + 1:
        raise DataError(
            f"training tokens: need a 1-D tensor of at least seq_len + 1 = {seq_len + 1} tokens, "
            f"got shape {tuple(tokens.shape)}; give more text or lower seq_len."
        )
    tokens = tokens.to(torch.long)
    offsets = torch.arange(seq_len + 1)  # (seq_len + 1,)

    def batch(index: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size * world_size,), generator=generator)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        return tokens[mine[:, None] + offsets]  # (batch, seq_len + 1)

    return batch


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only, as in nanoGPT."""
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


def process_group() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU does not support bfloat16; use precision: fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of a transformers model, non-reentrant (works with frozen inputs)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(
            {"use_reentrant": False}
        ) if on else model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        ) if on else model.gradient_checkpointing_disable()
    else:
        raise ConfigError(
            f"gradient_checkpointing: {type(model).__name__} does not support it; set gradient_checkpointing: false"
        )


def train(
    model: nn.Module,
    data: torch.Tensor | BatchFn,
    config: TrainConfig,
    *,
    loss_fn: LossFn = causal_lm_loss,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    run_id: dict | None = None,
    count_flops: bool = True,
    profile: HardwareProfile | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` in place on `data`; return the cost record.

    `data` is a 1-D token stream (windows are sampled from it) or a BatchFn. `loss_fn` computes
    the loss of one micro-batch (default: next-token cross-entropy). `wrap_model` wraps the
    model for the forward and backward passes (DistributedDataParallel); the optimizer and the
    checkpoints hold the unwrapped model. `progress` gets one line per loss record, `on_step`
    (steps done, steps) after every step. `run_id` is what else identifies the run (technique
    and its options) in the checkpoint fingerprint. With `count_flops`, `loss_fn` is also called
    once, on the unwrapped model, on a probe micro-batch before training (see _count_step_flops).
    `profile` is the hardware profile whose watts estimate the energy where no hardware counter
    is readable (None: the device's default profile).
    """
    check_config(config)
    if config.checkpoint_every and not config.checkpoint_dir:
        raise ConfigError(
            f"checkpoint_every={config.checkpoint_every} needs a checkpoint folder; set checkpoint_dir (a recipe run sets one per stage) or checkpoint_every: 0"
        )
    rank, world = process_group()
    batches = (
        random_windows(data, config.batch_size, config.seq_len, rank=rank, world_size=world)
        if isinstance(data, torch.Tensor)
        else data
    )
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    if not optimizer.param_groups[0]["params"] and not optimizer.param_groups[1]["params"]:
        raise ConfigError("training: no parameter of the model is trainable; select some parameters to train")
    settings = {
        **asdict(config),
        "world_size": world,
        "device": str(device),
        "run": run_id or {},
        "params": [(n, list(p.shape), p.requires_grad) for n, p in model.named_parameters()],
    }
    settings.pop("checkpoint_dir")
    fp = ckpt.fingerprint(settings)
    state = ckpt.load_latest(config.checkpoint_dir, fp) if config.checkpoint_every else None
    run = _restore(model, optimizer, generator, state) if state is not None else RunAccount()
    if config.gradient_checkpointing:
        _set_checkpointing(model, True)

    model.train()
    flops_per_step = (
        _count_step_flops(model, loss_fn, config, device) if count_flops else None
    )  # before wrapping: no collectives
    trained = wrap_model(model) if wrap_model else model
    meter = EnergyMeter(device, profile or get_profile(None, device.type))
    start = time.perf_counter()
    with meter:
        for step in range(run.start_step, config.steps):
            loss = _one_step(trained, model, optimizer, batches, generator, loss_fn, config, step, device)
            if run.add_loss(step, loss, config.log_every, config.steps) and progress is not None:
                elapsed = run.wall_before + time.perf_counter() - start
                progress(
                    f"step {step + 1}/{config.steps}  loss {run.losses[-1][1]:.4f}  lr {lr_at(step, config):.2e}  {elapsed:.0f}s"
                )
            if on_step:
                on_step(step + 1, config.steps)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _checkpoint(model, optimizer, generator, run, step + 1, meter, fp, config, rank)
    if config.gradient_checkpointing:
        _set_checkpointing(model, False)
    model.eval()
    if config.checkpoint_every and config.checkpoint_dir and rank == 0:
        ckpt.remove_checkpoints(config.checkpoint_dir)
    tokens = config.steps * config.batch_size * config.grad_accum * world * config.seq_len
    flops = flops_per_step * config.steps * world if flops_per_step is not None else None
    return run.result(model, config.steps, tokens, flops, meter, {k: v for k, v in settings.items() if k != "params"})


def _one_step(
    trained, model, optimizer, batches: BatchFn, generator, loss_fn: LossFn, config: TrainConfig, step: int, device
) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the step's mean loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config)
    optimizer.zero_grad(set_to_none=True)
    step_loss = 0.0
    for micro in range(config.grad_accum):
        window = batches(step * config.grad_accum + micro, generator).to(device)
        with _autocast(device, config.precision):
            loss = loss_fn(trained, window)
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at step {step + 1} (loss {loss.item()}); lower lr={config.lr}.")
        (loss / config.grad_accum).backward()  # dividing by 1 is exact: no accumulation, same bits
        step_loss += loss.item() / config.grad_accum
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    optimizer.step()
    return step_loss


def _count_step_flops(model: nn.Module, loss_fn: LossFn, config: TrainConfig, device) -> int:
    """FLOPs of one optimizer step: one micro-batch counted (frugalm.training.accounting), times grad_accum."""
    probe = torch.zeros(config.batch_size, config.seq_len + 1, dtype=torch.long, device=device)
    return count_step_flops(model, loss_fn, probe, _autocast(device, config.precision)) * config.grad_accum


def _checkpoint(
    model, optimizer, generator, run: RunAccount, step: int, meter, fp: str, config: TrainConfig, rank: int
) -> None:
    if rank == 0:
        ckpt.save_checkpoint(config.checkpoint_dir, ckpt.TrainState(
            step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), generator=generator.get_state(),
            cpu_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            fingerprint=fp, **run.for_checkpoint(meter),
        ))  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank runs ahead of a checkpoint that is not yet complete


def _restore(model, optimizer, generator, state: ckpt.TrainState) -> RunAccount:
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    generator.set_state(state.generator)
    torch.set_rng_state(state.cpu_rng)
    if state.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    return RunAccount.resumed(state)


def train_causal_lm(
    model: nn.Module, data: torch.Tensor | BatchFn, config: TrainConfig, progress: Callable[[str], None] | None = None
) -> TrainResult:
    """Train `model` in place on next-token prediction (the default model's builder uses this)."""
    return train(model, data, config, progress=progress)
