"""What every training stage shares: its options, its training text, and one call of the loop.

The training stages (distill, lora_finetune, masked_finetune, full_finetune) each take a config
that extends `TrainingOptions` with their own options, and call `run_training`, which resolves
the training text, runs `frugalm.training.loop.train` with the stage's loss, and returns the
loop's cost record for the stage's change record.

Options: `TrainingOptions` is the loop's own `LoopOptions` (each option declared once there,
with its type, doc and default) plus the training text and the window sampling; it restates
only the defaults a fine-tuning stage wants otherwise, and says why.

Training text (`training_documents`: the one place a stage picks it, the dedup_data stage
included): the stage's `data` file, or by default the Context's training documents (a recipe run
puts there the evaluation text minus its evaluated part, see frugalm.run.evaluation_split; a
dedup_data stage replaces them with its kept documents). Documents of the evaluated part are
dropped from any training text (`drop_evaluated`), a `data` file included, so held-out quality
is never measured on text the variant was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from frugalm.errors import ConfigError, DataError, TechniqueError, problems_message
from frugalm.models import context_length
from frugalm.techniques.base import Context
from frugalm.text.encode import encode_documents
from frugalm.text.files import read_text, split_documents
from frugalm.training.accounting import TrainResult
from frugalm.training.importance import ImportanceWindows, sampling_problems
from frugalm.training.loop import LoopOptions, LossFn, TrainConfig, causal_lm_loss, process_group, train

SAMPLINGS = ("uniform", "importance")


@dataclass(frozen=True, kw_only=True)
class TrainingOptions(LoopOptions):
    # Stage defaults, where they differ from the loop's (which suit pre-training from scratch): a
    # stage adapts an already trained model, after compression, on the little text a run has; a
    # short budget of small batches recovers most of what it can. No weight decay by default: it
    # pulls the trained weights toward zero, away from the model being adapted (distill and
    # full_finetune, which retrain whole networks, set their own). Each stage states its own lr.
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    warmup_steps: int = 20
    weight_decay: float = 0.0
    log_every: int = 20

    data: str | None = None
    """Training text file (UTF-8, documents split at `<|endoftext|>` lines); None: the evaluation text minus its evaluated part."""
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
        problems = super().problems()
        if self.sampling not in SAMPLINGS:
            problems.append(f"sampling={self.sampling!r} must be one of {', '.join(SAMPLINGS)}")
        if self.sampling == "importance":
            problems += sampling_problems(pool=("sampling_pool", self.sampling_pool), rescore_every=("rescore_every", self.rescore_every),
                                          power=("sampling_power", self.sampling_power), uniform_mix=("sampling_mix", self.sampling_mix))  # fmt: skip
            if self.checkpoint_every and self.rescore_every >= 1 and self.checkpoint_every % self.rescore_every:
                problems.append(
                    f"checkpoint_every={self.checkpoint_every} must be a multiple of rescore_every={self.rescore_every} (a resume must start at a rescoring to continue exactly)"
                )
        return problems


def train_config(options: TrainingOptions, model: nn.Module, ctx: Context) -> TrainConfig:
    """The loop's config from a stage's options; seq_len capped at the model's context."""

    names = {f.name for f in fields(LoopOptions)} - {"seq_len"}
    context = context_length(model.config) if hasattr(model, "config") else None
    seq_len = min(options.seq_len, context) if context else options.seq_len
    return TrainConfig(**{n: getattr(options, n) for n in names}, seq_len=seq_len, checkpoint_dir=ctx.checkpoint_dir)


def training_documents(data: str | None, ctx: Context, technique: str) -> tuple[list[str], str]:
    """(documents, where they come from) of the training text a stage reads: its `data` file, else
    ctx.training_documents. The evaluated documents are still in: `drop_evaluated` removes them."""

    if data is not None:
        path = Path(data).expanduser()
        if path.is_file() and not path.read_bytes().strip():
            raise DataError(
                f"{technique}: training text '{data}' is empty; pass a `data:` file that holds training text"
            )
        return split_documents(read_text(path)), str(data)
    if ctx.training_documents is not None:
        return list(ctx.training_documents), ctx.training_source or "the evaluation text minus its evaluated part"
    raise DataError(f"{technique}: no training text; set the stage option `data: FILE` (UTF-8 text)")


def drop_evaluated(docs: list[str], ctx: Context) -> tuple[list[str], int]:
    """`docs` without the evaluated (held-out) documents, and how many were dropped."""
    held_out = set(ctx.held_out_documents or ())
    kept = [d for d in docs if d not in held_out]
    return kept, len(docs) - len(kept)


def training_tokens(options: TrainingOptions, ctx: Context, technique: str, seq_len: int) -> tuple[torch.Tensor, dict]:
    """1-D token stream of the stage's training text ([BOS] + tokens per document) and its description."""

    if ctx.tokenizer is None:
        raise TechniqueError(
            f"{technique}: the stage needs the model's tokenizer in its Context (Context(tokenizer=...)); run it through a recipe or pass one"
        )
    docs, source = training_documents(options.data, ctx, technique)
    kept, dropped = drop_evaluated(docs, ctx)
    if not kept:
        raise DataError(
            f"{technique}: training text {source} has no document left once the evaluated (held-out) documents are removed; pass another `data:` file"
        )
    stream = encode_documents(ctx.tokenizer, kept).ids
    need = seq_len + 1
    if stream.numel() < 2 * need:
        raise DataError(
            f"{technique}: training text {source} is too short: {stream.numel()} tokens, need at least {2 * need} for seq_len {seq_len}; pass a longer `data:` file or lower seq_len"
        )
    return stream, {
        "source": source,
        "documents": len(kept),
        "held_out_documents_dropped": dropped,
        "tokens": int(stream.numel()),
    }


def run_training(
    model: nn.Module,
    options: TrainingOptions,
    ctx: Context,
    technique: str,
    *,
    loss_fn: LossFn = causal_lm_loss,
    run_id: dict | None = None,
) -> tuple[TrainResult, dict]:
    """Train `model`'s trainable parameters per the stage's options; (cost record, text description)."""
    if problems := options.problems():  # a config built in code, not through a recipe, is checked here
        raise ConfigError(problems_message(technique, problems))
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
