"""Full fine-tuning: every parameter trains on next-token prediction (the baseline of all PEFT).

The most expressive adaptation and the most expensive: gradients and two AdamW moments for
every parameter (about 4x the weights' memory on top of activations). Use it to recover from
compression when memory allows, or as the reference a parameter-efficient stage is judged
against. Options are the shared training options (see `frugalm ls techniques`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.training_stage import TrainingOptions, run_training


@dataclass(frozen=True, kw_only=True)
class FullFinetuneConfig(TrainingOptions):
    lr: float = 3e-4  # every weight trains: a smaller step than the stages that train a few parameters
    weight_decay: float = 0.1  # the whole network trains: decay as in pre-training (the loop's default)


def apply(model: nn.Module, config: FullFinetuneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        result, text = run_training(model, config, ctx, name)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    record_change(
        ctx,
        name,
        list(flags),
        sum(p.numel() for p in model.parameters()),
        model,
        training=result.cost(),
        training_text=text,
    )
    return model


TECHNIQUE = Technique(name="full_finetune", config_cls=FullFinetuneConfig, apply=apply, kind="training")
