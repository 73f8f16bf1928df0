"""Model cascade (Tabi: Wang et al. 2023): a small model answers each task item, the large one only when the small one is unsure.

A system stage: the incoming model is the large one and keeps its weights; the stage adds a small
model and a threshold. The small model is a given folder (any model with the same tokenizer, e.g.
a quantized variant of this one), or by default this model quantized to int4 here (round to
nearest, groups of 32). Both score `items` task items built from the training part of the
evaluation text (never the evaluated part, so the threshold is not fitted to the figures it is
judged by); for every threshold at once (measure/cascade.py) that gives accuracy against FLOPs.
With `confidence: auto` each of max_prob, margin and entropy is tried and the one whose chosen
threshold costs least wins; the chosen threshold is the cheapest whose accuracy is within
`max_drop` of the large model alone. A given `tau` is used as is. Both are recorded with the sweep.

The small model travels inside the artifact (`cascade/`, a variant folder of its own). The
benchmark scores the variant's task figures through the cascade (runtime/cascade); perplexity and
the workloads' timings stay the large model's (a cascade routes whole task items, not tokens).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.measure import cascade as sweep
from frugalm.measure.memory import params_count
from frugalm.measure.tasks import TASKS, TaskProtocol, build_items, score_items
from frugalm.models import context_length, load_model
from frugalm.runtime import cascade, decoding
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.techniques import quant_rtn
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class CascadeConfig:
    small: str | None = None
    """Folder of the small model (same tokenizer); None: this model quantized to int4 here (RTN, groups of 32)."""
    task: str = "choice"
    """Task the threshold is chosen on: choice, cloze or code (measure/tasks.py)."""
    confidence: str = "auto"
    """max_prob, margin, entropy, or auto: the one whose chosen threshold costs least on the calibration items."""
    max_drop: float = 0.01
    """Accuracy (a fraction) the cascade may lose against the large model alone when the threshold is chosen."""
    tau: float | None = None
    """A fixed threshold in [0, 1] (None: chosen as above)."""
    items: int = 400
    """Calibration items (from the training part of the text)."""
    context_tokens: int = 128
    """Context tokens per calibration item at most (as the benchmark's --task-context)."""
    choices: int = 4
    """Options per multiple-choice item (as --task-choices)."""
    seed: int = 0
    """Seed of the calibration items' sample and distractors."""

    def problems(self) -> list[str]:
        out = []
        if self.task not in TASKS:
            out.append(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.confidence not in (*cascade.CONFIDENCES, "auto"):
            out.append(f"confidence must be one of {', '.join(cascade.CONFIDENCES)} or auto, got {self.confidence!r}")
        if not 0 <= self.max_drop < 1:
            out.append(f"max_drop must be in [0, 1) (a fraction of accuracy, e.g. 0.01), got {self.max_drop}")
        if self.tau is not None and not 0 <= self.tau <= 1:
            out.append(f"tau must be in [0, 1] (a confidence), got {self.tau}")
        if self.items < 20:
            out.append(f"items must be at least 20 to choose a threshold, got {self.items}")
        return out


def _small_model(model: nn.Module, config: CascadeConfig, ctx: Context) -> tuple[nn.Module, str]:
    if config.small is None:
        small = copy.deepcopy(model)
        small = quant_rtn.apply(small, quant_rtn.RTNQuantConfig(bits=4, group_size=32), Context(device=ctx.device))
        return small, "this model, int4 RTN in groups of 32"
    lm = load_model(config.small, device=str(ctx.device), fast_kernels=False)
    if lm.inference.get(decoding.SETTING) or lm.inference.get(cascade.SETTING):
        raise TechniqueError(
            f"cascade: small model '{config.small}' carries a decoding strategy or cascade; give a plain model"
        )
    if ctx.tokenizer is not None and lm.tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise TechniqueError(
            f"cascade: small model '{config.small}' has another tokenizer; the two models must score the same items: pick one with this model's tokenizer"
        )
    return lm.model, config.small


def apply(model: nn.Module, config: CascadeConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    if inference_settings(model).get(cascade.SETTING):
        raise TechniqueError(f"{name}: this variant is already a cascade; a variant carries one")
    if not ctx.training_documents:
        raise TechniqueError(f"{name}: no training text to choose the threshold on; pass a longer evaluation text")
    protocol = TaskProtocol(tasks=(config.task,), items=config.items, context_tokens=config.context_tokens,
                            choices=config.choices, seed=config.seed)  # fmt: skip
    items, _ = build_items(config.task, ctx.training_documents, protocol)
    if len(items) < 20:
        raise TechniqueError(
            f"{name}: the training text gives {len(items)} {config.task} items; at least 20 are needed: pass a longer text"
        )
    small, origin = _small_model(model, config, ctx)
    small.eval()
    for p in small.parameters():
        p.requires_grad_(False)
    limit = context_length(model.config)
    scores = [
        score_items(m, ctx.tokenizer, items, config.task, protocol, max_len=limit, flops=True) for m in (small, model)
    ]
    analysis = sweep.analyse(*scores, config.max_drop)
    measure = analysis["best"] if config.confidence == "auto" else config.confidence
    tau = config.tau if config.tau is not None else analysis["measures"][measure]["chosen"]["tau"]
    cascade.attach(model, small)
    setting = {"task": config.task, "confidence": measure, "tau": tau, "context_tokens": config.context_tokens,
               "choices": config.choices}  # fmt: skip
    setattr(model, INFERENCE_ATTR, {**inference_settings(model), cascade.SETTING: setting})
    record_change(ctx, name, [], 0, model, inference={cascade.SETTING: setting}, small=origin,
                  small_params=params_count(small), calibration_items=len(items), sweep=analysis)  # fmt: skip
    return model


TECHNIQUE = Technique(name="cascade", config_cls=CascadeConfig, apply=apply, kind="acceleration",
                      needs_training_text=True)  # fmt: skip
