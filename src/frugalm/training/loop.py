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

Cost record: wall time, FLOPs (counted with torch's FLOP counter over one whole step, forward
and backward of every micro-batch, a teacher's forward included, times the steps; the analytic
6 * params * tokens is kept beside it), tokens seen, energy (hardware counter or the stated
power model of frugalm.measure.energy, with the hardware profile the caller gives) and the loss
curve. Checkpoints carry the energy spent so far, so a resumed run's figure covers every segment;
one resumed from a checkpoint written before energy was stored says which steps it covers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import ConfigError, DataError
from frugalm.measure.compute import _EXTRA_FLOP_FORMULAS
from frugalm.measure.cost import get_profile
from frugalm.measure.energy import EnergyMeter
from frugalm.training import checkpoint as ckpt

if TYPE_CHECKING:
    from frugalm.measure.cost import HardwareProfile

BatchFn = Callable[[int, torch.Generator], torch.Tensor]
"""(micro-batch index, generator) -> int64 tensor (batch, seq_len + 1): inputs [:, :-1], targets [:, 1:]."""
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""(model, window (batch, seq_len + 1)) -> scalar loss to minimise."""
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Windows per micro-batch (per process in data-parallel training)."""
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
    """Seeds window sampling (and torch's global RNG, for dropout and adapter initialisation)."""
    log_every: int = 50
    """Record the mean training loss every this many steps (and at the last step)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed per optimizer step (effective batch = batch_size * grad_accum)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast for the forward pass (weights, gradients and optimizer state stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them (less memory, ~1/3 more compute)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps into checkpoint_dir; 0: never."""
    checkpoint_dir: str | None = None
    """Folder of the checkpoints; a run started with a checkpoint there resumes from it, and deletes them when it completes."""


def config_problems(config) -> list[str]:
    """Every bad training option of `config` (a TrainConfig, or a stage config with the same fields)."""
    problems = [
        f"{name}={getattr(config, name)!r} must be >= {low}"
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("log_every", 1), ("grad_accum", 1),
                          ("warmup_steps", 0), ("weight_decay", 0), ("grad_clip", 0), ("checkpoint_every", 0))
        if getattr(config, name) < low
    ]  # fmt: skip
    if config.steps == 0:
        problems[0] = "steps=0 must be >= 1 (a budget of zero steps trains nothing; give steps >= 1 or remove the stage)"
    if not config.lr > 0:
        problems.append(f"lr={config.lr!r} must be > 0")
    if not 0 <= config.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio={config.min_lr_ratio!r} must be in [0, 1]")
    if config.precision not in PRECISIONS:
        problems.append(f"precision={config.precision!r} must be one of {', '.join(PRECISIONS)}")
    return problems


def check_config(config: TrainConfig) -> None:
    """Raise one ConfigError listing every bad field."""
    problems = config_problems(config)
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


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, *, rank: int = 0, world_size: int = 1) -> BatchFn:
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


@dataclass(frozen=True)
class TrainResult:
    losses: list[tuple[int, float]]
    """(step, mean training loss over the steps since the previous record), step is 1-based."""
    final_loss: float
    """The last recorded mean training loss."""
    tokens_seen: int
    """Target tokens processed, over all processes: steps * batch_size * grad_accum * world_size * seq_len."""
    wall_time_s: float
    """Training wall time over every segment of the run (time lost after the last checkpoint of a killed segment is not counted)."""
    flops: int | None = None
    """Counted FLOPs of the whole run (one step counted with torch's FLOP counter, times the steps); None when not counted."""
    flops_analytic: int = 0
    """6 * parameters * tokens_seen: the usual estimate for full training (forward 2N, backward 4N per token)."""
    energy_j: float = 0.0
    energy_method: str = "estimated"
    energy_protocol: dict = field(default_factory=dict)
    resumed_from_step: int = 0
    """The step of the checkpoint this run resumed from (0: started fresh)."""
    params: int = 0
    trainable_params: int = 0
    settings: dict = field(default_factory=dict)

    def _flops_method(self) -> str | None:
        if self.flops is None:
            return None
        scoring = " + importance scoring: one window's forward x windows scored" if "sampling" in self.settings else ""
        return "counted: torch FlopCounterMode over one step x steps" + scoring

    def cost(self) -> dict:
        """The cost record stored with a variant: JSON-ready, units in the names."""
        return {
            "wall_s": self.wall_time_s, "flops": self.flops, "flops_method": self._flops_method(),
            "flops_analytic_6nt": self.flops_analytic, "tokens_seen": self.tokens_seen, "energy_j": self.energy_j,
            "energy_method": self.energy_method, "energy_protocol": self.energy_protocol, "params": self.params,
            "trainable_params": self.trainable_params, "resumed_from_step": self.resumed_from_step,
            "loss_curve": self.losses, "final_loss": self.final_loss, "settings": self.settings,
        }  # fmt: skip


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
        model.activation_checkpointing_enable({"use_reentrant": False}) if on else model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}) if on else model.gradient_checkpointing_disable()
    else:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; set gradient_checkpointing: false")


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
        raise ConfigError(f"checkpoint_every={config.checkpoint_every} needs a checkpoint folder; set checkpoint_dir (a recipe run sets one per stage) or checkpoint_every: 0")
    rank, world = process_group()
    batches = random_windows(data, config.batch_size, config.seq_len, rank=rank, world_size=world) if isinstance(data, torch.Tensor) else data
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    if not optimizer.param_groups[0]["params"] and not optimizer.param_groups[1]["params"]:
        raise ConfigError("training: no parameter of the model is trainable; select some parameters to train")
    settings = {**asdict(config), "world_size": world, "device": str(device), "run": run_id or {}, "params": [(n, list(p.shape), p.requires_grad) for n, p in model.named_parameters()]}
    settings.pop("checkpoint_dir")
    fp = ckpt.fingerprint(settings)
    state = ckpt.load_latest(config.checkpoint_dir, fp) if config.checkpoint_every else None
    run = _LoopState(losses=[], pending=(0.0, 0), start_step=0, wall_before=0.0, energy_before=0.0, energy_method_before=None, energy_from_step=0)
    if state is not None:
        run = _restore(model, optimizer, generator, state)
    if config.gradient_checkpointing:
        _set_checkpointing(model, True)

    model.train()
    flops_per_step = _count_step_flops(model, loss_fn, config, device) if count_flops else None  # before wrapping: no collectives
    trained = wrap_model(model) if wrap_model else model
    meter = EnergyMeter(device, profile or get_profile(None, device.type))
    start = time.perf_counter()
    with meter:
        for step in range(run.start_step, config.steps):
            loss = _one_step(trained, model, optimizer, batches, generator, loss_fn, config, step, device)
            run.add_loss(step, loss, config, progress, start)
            if on_step:
                on_step(step + 1, config.steps)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _checkpoint(model, optimizer, generator, run, step + 1, meter, fp, config, rank)
    if config.gradient_checkpointing:
        _set_checkpointing(model, False)
    model.eval()
    if config.checkpoint_every and config.checkpoint_dir and rank == 0:
        ckpt.remove_checkpoints(config.checkpoint_dir)
    return _result(model, config, run, world, flops_per_step, meter, settings)


@dataclass
class _LoopState:
    losses: list[tuple[int, float]]
    pending: tuple[float, int]
    start_step: int
    wall_before: float
    energy_before: float
    """Joules of the earlier segments (stored in the checkpoint resumed from)."""
    energy_method_before: str | None
    energy_from_step: int
    """The first step the energy covers (0 unless resumed from a checkpoint that stored none)."""

    def energy_method(self, meter) -> str:
        """'measured' only when this segment and every earlier one read a hardware counter."""
        return "measured" if meter.method == "measured" and self.energy_method_before in (None, "measured") else "estimated"

    def add_loss(self, step: int, loss: float, config: TrainConfig, progress, start: float) -> None:
        total, n = self.pending[0] + loss, self.pending[1] + 1
        self.pending = (total, n)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            self.losses.append((step + 1, total / n))
            self.pending = (0.0, 0)
            if progress is not None:
                elapsed = self.wall_before + time.perf_counter() - start
                progress(f"step {step + 1}/{config.steps}  loss {self.losses[-1][1]:.4f}  lr {lr_at(step, config):.2e}  {elapsed:.0f}s")


def _one_step(trained, model, optimizer, batches: BatchFn, generator, loss_fn: LossFn, config: TrainConfig, step: int, device) -> float:
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
    """FLOPs of one optimizer step: forward and backward of one micro-batch, counted, times grad_accum.

    Counted on a probe micro-batch (token id 0 everywhere: FLOPs do not depend on the values)
    before training, not inside a real step: torch's counter dispatches some ops differently,
    which would change the trained bits. The probe's gradients are dropped and torch's RNG state
    restored, so training is unaffected. The optimizer's elementwise update is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode


    rng = torch.get_rng_state()
    probe = torch.zeros(config.batch_size, config.seq_len + 1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        with _autocast(device, config.precision):
            loss = loss_fn(model, probe)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    torch.set_rng_state(rng)
    return counter.get_total_flops() * config.grad_accum


def _checkpoint(model, optimizer, generator, run: _LoopState, step: int, meter, fp: str, config: TrainConfig, rank: int) -> None:
    if rank == 0:
        joules = meter.so_far()  # also brings meter.wall_s up to now
        ckpt.save_checkpoint(config.checkpoint_dir, ckpt.TrainState(
            step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), generator=generator.get_state(),
            cpu_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            losses=list(run.losses), pending=run.pending, wall_s=run.wall_before + meter.wall_s, fingerprint=fp,
            energy_j=run.energy_before + joules, energy_method=run.energy_method(meter), energy_from_step=run.energy_from_step,
        ))  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank runs ahead of a checkpoint that is not yet complete


def _restore(model, optimizer, generator, state: ckpt.TrainState) -> _LoopState:
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    generator.set_state(state.generator)
    torch.set_rng_state(state.cpu_rng)
    if state.cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.cuda_rng)
    stored = state.energy_j is not None  # checkpoints written before energy was stored have none
    return _LoopState(
        losses=list(state.losses), pending=tuple(state.pending), start_step=state.step, wall_before=state.wall_s,
        energy_before=state.energy_j if stored else 0.0, energy_method_before=state.energy_method if stored else None,
        energy_from_step=state.energy_from_step if stored else state.step,
    )  # fmt: skip


def _result(model, config: TrainConfig, run: _LoopState, world: int, flops_per_step, meter, settings: dict) -> TrainResult:
    tokens = config.steps * config.batch_size * config.grad_accum * world * config.seq_len
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    protocol = _energy_protocol(meter, run, config.steps)
    return TrainResult(
        losses=run.losses, final_loss=run.losses[-1][1], tokens_seen=tokens, wall_time_s=run.wall_before + meter.wall_s,
        flops=flops_per_step * config.steps * world if flops_per_step is not None else None,
        flops_analytic=6 * params * tokens, energy_j=run.energy_before + meter.joules, energy_method=run.energy_method(meter), energy_protocol=protocol,
        resumed_from_step=run.start_step, params=params, trainable_params=trainable,
        settings={k: v for k, v in settings.items() if k != "params"},
    )  # fmt: skip


def _energy_protocol(meter, run: _LoopState, steps: int) -> dict:
    """The meter's protocol of the last segment, plus which steps the run's energy figure covers."""
    protocol = {**meter.protocol(), "covers": f"steps {run.energy_from_step}..{steps} of {steps}", "uncovered_steps": run.energy_from_step}
    if not run.start_step:
        return protocol
    at, since = run.start_step, run.energy_from_step
    notes = [f"wall_s and joules above are the segment after the resume at step {at}"]
    if since < at:
        protocol["energy_before_resume_j"], protocol["energy_before_resume_method"] = run.energy_before, run.energy_method_before
        notes.append(f"the figure adds the {run.energy_before:.6g} J the checkpoint stored for steps {since}..{at}")
    if since:
        notes.append(f"steps 0..{since} are not counted: a checkpoint this run resumed from predates stored energy")
    notes.append("the energy of work a killed segment did after its last checkpoint is not counted (that work is redone and counted then)")
    return {**protocol, "resumed_at_step": at, "note": "; ".join(notes)}


def train_causal_lm(model: nn.Module, data: torch.Tensor | BatchFn, config: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` in place on next-token prediction (the default model's builder uses this)."""
    return train(model, data, config, progress=progress)
