"""What every training stage shares: its options, its training text, and one call of the loop.

The training stages (distill, lora_finetune, masked_finetune, full_finetune) each take a config
that extends `TrainingOptions` (one level) with their own options, and call `run_training`,
which resolves the training text, runs `frugalm.training.loop.train` with the stage's loss,
and returns the loop's cost record for the stage's change record.

Training text: the stage's `data` file, or by default the run's evaluation text minus its
evaluated part (the pipeline puts it in the Context). Documents of the evaluated part are
dropped from any training text, a `data` file included, so held-out quality is never measured
on text the variant was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from frugalm.errors import DataError, TechniqueError
from frugalm.models import context_length
from frugalm.techniques.base import Context
from frugalm.text.encode import encode_documents
from frugalm.text.files import read_text, split_documents
from frugalm.training.importance import ImportanceWindows
from frugalm.training.loop import (
    LossFn,
    TrainConfig,
    TrainResult,
    causal_lm_loss,
    config_problems,
    process_group,
    train,
)

SAMPLINGS = ("uniform", "importance")


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    data: str | None = None
    """Training text file (UTF-8, documents split at `<|endoftext|>` lines); None: the evaluation text minus its evaluated part."""
    steps: int = 200
    """Optimizer steps (the training budget)."""
    batch_size: int = 8
    """Windows per micro-batch."""
    seq_len: int = 256
    """Tokens per training window (capped at the model's context)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    lr: float = 1e-3
    """Peak learning rate, after linear warm-up; cosine decay to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 20
    """Steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay on trained matrices."""
    grad_clip: float = 1.0
    """Maximum global gradient norm; 0 disables clipping."""
    seed: int = 0
    """Seeds window sampling and any random initialisation (adapters)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast for the forward pass."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~1/3 more compute)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: never); a rerun resumes from the last one."""
    log_every: int = 20
    """Record the mean training loss every this many steps."""
    sampling: Literal["uniform", "importance"] = "uniform"
    """How windows are drawn: 'uniform' from the text, or 'importance': every rescore_every steps a pool of random windows is scored with the model being trained and batches drawn from it with probability growing with the loss (frugalm.training.importance; the scoring's FLOPs count as training cost)."""
    sampling_pool: int = 256
    """Windows scored per rescoring (importance sampling): one forward pass each."""
    sampling_power: float = 1.0
    """Tempering exponent on the loss (importance sampling): 0 uniform, 1 proportional, larger favours the hardest."""
    sampling_mix: float = 0.1
    """Share of probability spread uniformly over the pool (importance sampling), in [0, 1]."""
    rescore_every: int = 50
    """Steps between rescorings of a fresh pool (importance sampling); checkpoint_every must be a multiple of it."""

    def problems(self) -> list[str]:
        problems = config_problems(self)
        if self.sampling not in SAMPLINGS:
            problems.append(f"sampling={self.sampling!r} must be one of {', '.join(SAMPLINGS)}")
        if self.sampling == "importance":
            problems += [f"{name}={getattr(self, name)!r} must be >= 1" for name in ("sampling_pool", "rescore_every") if getattr(self, name) < 1]
            if not self.sampling_power >= 0:
                problems.append(f"sampling_power={self.sampling_power!r} must be >= 0 (0 samples uniformly)")
            if not 0 <= self.sampling_mix <= 1:
                problems.append(f"sampling_mix={self.sampling_mix!r} must be in [0, 1]")
            if self.checkpoint_every and self.rescore_every >= 1 and self.checkpoint_every % self.rescore_every:
                problems.append(f"checkpoint_every={self.checkpoint_every} must be a multiple of rescore_every={self.rescore_every} (a resume must start at a rescoring to continue exactly)")
        return problems


def train_config(options: TrainingOptions, model: nn.Module, ctx: Context) -> TrainConfig:
    """The loop's config from a stage's options; seq_len capped at the model's context."""

    names = {f.name for f in fields(TrainConfig)} - {"checkpoint_dir", "seq_len"}
    context = context_length(model.config) if hasattr(model, "config") else None
    seq_len = min(options.seq_len, context) if context else options.seq_len
    return TrainConfig(**{n: getattr(options, n) for n in names}, seq_len=seq_len, checkpoint_dir=ctx.checkpoint_dir)


def training_tokens(options: TrainingOptions, ctx: Context, technique: str, seq_len: int) -> tuple[torch.Tensor, dict]:
    """1-D token stream of the stage's training text ([BOS] + tokens per document) and its description."""

    if ctx.tokenizer is None:
        raise TechniqueError(f"{technique}: the stage needs the model's tokenizer in its Context (Context(tokenizer=...)); run it through a recipe or pass one")
    if options.data is not None:
        path = Path(options.data).expanduser()
        if path.is_file() and not path.read_bytes().strip():
            raise DataError(f"{technique}: training text '{options.data}' is empty; pass a `data:` file that holds training text")
        docs, source = split_documents(read_text(path)), str(options.data)
    elif ctx.training_documents is not None:
        docs, source = list(ctx.training_documents), ctx.training_source or "the evaluation text minus its evaluated part"
    else:
        raise DataError(f"{technique}: no training text; set the stage option `data: FILE` (UTF-8 text)")
    held_out = set(ctx.held_out_documents or ())
    kept = [d for d in docs if d not in held_out]
    if not kept:
        raise DataError(f"{technique}: training text {source} has no document left once the evaluated (held-out) documents are removed; pass another `data:` file")
    stream = encode_documents(ctx.tokenizer, kept).ids
    need = seq_len + 1
    if stream.numel() < 2 * need:
        raise DataError(f"{technique}: training text {source} is too short: {stream.numel()} tokens, need at least {2 * need} for seq_len {seq_len}; pass a longer `data:` file or lower seq_len")
    return stream, {"source": source, "documents": len(kept), "held_out_documents_dropped": len(docs) - len(kept), "tokens": int(stream.numel())}


def run_training(model: nn.Module, options: TrainingOptions, ctx: Context, technique: str, *, loss_fn: LossFn = causal_lm_loss, run_id: dict | None = None) -> tuple[TrainResult, dict]:
    """Train `model`'s trainable parameters per the stage's options; (cost record, text description)."""
    config = train_config(options, model, ctx)
    tokens, text = training_tokens(options, ctx, technique, config.seq_len)
    data, sampler = tokens, None
    if options.sampling == "importance":

        rank, world = process_group()
        data = sampler = ImportanceWindows(
            model, tokens, batch_size=config.batch_size, seq_len=config.seq_len, pool=options.sampling_pool, power=options.sampling_power,
            uniform_mix=options.sampling_mix, rescore_every=options.rescore_every, grad_accum=config.grad_accum, rank=rank, world_size=world,
        )  # fmt: skip
    result = train(
        model, data, config, loss_fn=loss_fn, wrap_model=ctx.wrap_model,
        on_step=lambda done, total: ctx.report(technique, done, total),
        run_id={"technique": technique, "options": repr(options), **(run_id or {})},
        profile=ctx.hardware_profile(next(model.parameters()).device.type),
    )  # fmt: skip
    if sampler is not None:  # the scoring forward passes are part of what the variant cost to produce
        selection = {**sampler.summary(), "scoring_flops_analytic_2nt": 2 * result.params * sampler.scored_tokens}
        flops = None if result.flops is None else result.flops + selection["scoring_flops"]
        result = replace(result, flops=flops, settings={**result.settings, "sampling": selection})
    return result, text


def trainable_summary(model: nn.Module) -> tuple[list[str], int]:
    """(names of trainable parameters, number of trainable values)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return names, sum(p.numel() for p in model.parameters() if p.requires_grad)
