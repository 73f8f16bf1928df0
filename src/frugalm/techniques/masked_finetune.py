"""Masking-based fine-tuning: only a chosen subset of parameters trains, everything else is frozen.

BitFit (Ben Zaken et al. 2021, arXiv:2106.10199) trains only the biases; training the
normalisation gains as well is the common variant for models without biases (Llama). The
subset is named by groups (`biases`, `norms`, `embeddings`) and/or fnmatch patterns over
parameter names (`model.layers.*.mlp.down_proj.weight`). Trains a tiny fraction of the
parameters, so optimizer memory is negligible and the variant ships as the same architecture;
it recovers less than LoRA or full fine-tuning when the damage is in the weight matrices.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.training_stage import TrainingOptions, run_training

GROUPS = ("biases", "norms", "embeddings")


@dataclass(frozen=True, kw_only=True)
class MaskedFinetuneConfig(TrainingOptions):
    train: tuple[str, ...] = ("biases", "norms")
    """What trains: groups (biases, norms = parameters of normalisation layers, embeddings) and/or fnmatch patterns over parameter names."""
    lr: float = 3e-3

    def problems(self) -> list[str]:
        return super().problems() + (
            [] if self.train else ["train must name at least one group or parameter pattern, e.g. [biases, norms]"]
        )


def _group_members(model: nn.Module, group: str) -> set[str]:
    if group == "biases":
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if group == "norms":  # LayerNorm, RMSNorm, LlamaRMSNorm ...: any module whose class name says Norm
        return {
            f"{m}.{p}" if m else p
            for m, mod in model.named_modules()
            if "norm" in type(mod).__name__.lower()
            for p, _ in mod.named_parameters(recurse=False)
        }
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {n for n, p in model.named_parameters() if emb is not None and p is emb.weight}


def select_parameters(model: nn.Module, train: tuple[str, ...], technique: str) -> list[str]:
    """Names of the parameters to train; a pattern matching nothing, or an empty selection, is an error."""
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in train:
        if item in GROUPS:
            chosen |= _group_members(model, item)
            continue
        matched = {n for n in names if fnmatch.fnmatchcase(n, item)}
        if not matched:
            raise TechniqueError(
                f"{technique}: train pattern '{item}' matches no parameter; groups are {', '.join(GROUPS)} and parameters are named like {names[:4]}"
            )
        chosen |= matched
    if not chosen:
        raise TechniqueError(
            f"{technique}: train {list(train)} selects no parameter of this model (no biases?); add 'norms' or a pattern such as '*.mlp.*.weight'"
        )
    return [n for n in names if n in chosen]


def apply(model: nn.Module, config: MaskedFinetuneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    chosen = set(select_parameters(model, config.train, name))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    try:
        result, text = run_training(model, config, ctx, name)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    trained = sum(p.numel() for n, p in model.named_parameters() if n in chosen)
    record_change(
        ctx, name, sorted(chosen), trained, model, train=list(config.train), training=result.cost(), training_text=text
    )
    return model


TECHNIQUE = Technique(name="masked_finetune", config_cls=MaskedFinetuneConfig, apply=apply, kind="training")
