"""Speculative decoding with a draft model: the variant generates its own greedy output, faster.

A decoding stage: the weights stay as they come. The draft is either a ready model (`draft`: a
folder with the target's tokenizer, used as is) or distilled here from the incoming model, with
every option of the `distill` stage (a layer-dropped copy trained on the teacher's soft targets,
`keep_layers` of its blocks, `steps` steps; or a smaller `student` model). The distillation's cost
is recorded with this stage, so it counts in the variant's production cost.

The draft travels inside the artifact (`draft/`, a variant folder of its own), so the variant is
self-contained; `load_model` attaches it. Whoever runs the variant asks runtime/decoding for its
proposer; the benchmark measures its speed as whole batch-1 generations against plain greedy,
and counts the guesses made and kept. It speeds up batch-1 decoding when the draft is much cheaper
than the target and agrees with it often: acceptance rate and the draft's cost decide, and the
benchmark states both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.models import load_model
from frugalm.runtime import compiled, decoding
from frugalm.runtime.families import describe, family
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.techniques import distill
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig(distill.DistillConfig):
    draft: str | None = None
    """Folder of a ready draft model with the target's tokenizer, used as is; None: distil one from the model (the distill options below)."""
    k: int = 4
    """Guesses per round (the most, when threshold > 0)."""
    threshold: float = 0.0
    """Adaptive rounds: the draft stops guessing once its top probability falls below this (0: always k guesses)."""
    compiled: bool = False
    """Run each round's draft steps as one compiled graph (runtime/decoding.CompiledDraftProposer): needs a C++ compiler on CPU; compiles once per process and cache length (tens of seconds, stored as compile_s)."""
    steps: int = 400
    alpha: float = 0.9

    def problems(self) -> list[str]:
        problems = [p for p in super().problems() if self.draft is None]
        if self.k < 1:
            problems.append(f"k must be at least 1 guess per round (e.g. 4), got {self.k}")
        if not 0 <= self.threshold < 1:
            problems.append(
                f"threshold must be in [0, 1) (a probability; 0 turns adaptive rounds off), got {self.threshold}"
            )
        if self.draft is not None and self.student is not None:
            problems.append(
                "give either `draft` (a ready draft) or `student` (a model to distil into a draft), not both"
            )
        return problems


def check_decodable(model: nn.Module, name: str) -> None:
    """Refuse what a speculative decoding stage cannot run on."""
    if family(model) == "recurrent":
        raise TechniqueError(
            f"{name}: {describe(model)} models are not supported: a recurrent state cannot be rewound to drop rejected guesses; supported: Transformers (dense or mixture-of-experts)"
        )
    settings = inference_settings(model)
    if settings.get(compiled.SETTING):
        raise TechniqueError(
            f"{name}: this variant decodes compiled on a static cache (compile_decode); speculative rounds run eager: drop one of the two stages"
        )
    if settings.get(decoding.SETTING):
        raise TechniqueError(
            f"{name}: this variant already decodes with {settings[decoding.SETTING]['method']}; a variant carries one decoding strategy"
        )


def set_decoding(model: nn.Module, setting: dict) -> None:
    setattr(model, INFERENCE_ATTR, {**inference_settings(model), decoding.SETTING: setting})


def _ready_draft(path: str, ctx: Context) -> nn.Module:
    lm = load_model(path, device=str(ctx.device), fast_kernels=False)
    if lm.inference.get(decoding.SETTING):
        raise TechniqueError(
            f"speculative: draft '{path}' decodes with {lm.inference[decoding.SETTING]['method']} itself; give the draft's plain model"
        )
    if ctx.tokenizer is not None and lm.tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise TechniqueError(
            f"speculative: draft '{path}' has another tokenizer ({len(lm.tokenizer)} tokens, the target {len(ctx.tokenizer)}); "
            "its guesses cannot be checked token by token: pick a draft trained with the target's tokenizer, or leave `draft` out to distil one"
        )
    return lm.model


def apply(model: nn.Module, config: SpeculativeConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    check_decodable(model, name)
    if config.compiled and config.draft is None and config.student is None:
        # the distilled draft will be a copy of this model: refuse before training it
        compiled.check_fits(model, f"{name} (compiled: true)")
    if config.draft is not None:
        draft = _ready_draft(config.draft, ctx)
        made = {"draft": config.draft}
    else:
        options = {f.name: getattr(config, f.name) for f in fields(distill.DistillConfig)}
        draft = distill.apply(model, distill.DistillConfig(**options), ctx)
        record = (
            ctx.changes.pop()
        )  # the distillation's record lives with this stage; its training cost is the variant's
        made = {"draft": "distilled here", "training": record.pop("training"), "distill": record}
    draft.eval()
    for p in draft.parameters():
        p.requires_grad_(False)
    if config.compiled:
        compiled.check_fits(draft, f"{name} (compiled: true)")
    decoding.attach_draft(model, draft)
    setting = {"method": "speculative", "k": config.k, "threshold": config.threshold}
    if config.compiled:
        setting["compile"] = True
    set_decoding(model, setting)
    params = sum(p.numel() for p in draft.parameters())
    record_change(ctx, name, [], 0, model, inference={decoding.SETTING: setting}, draft_params=params,
                  draft_layers=draft.config.num_hidden_layers, **made)  # fmt: skip
    return model


TECHNIQUE = Technique(name="speculative", config_cls=SpeculativeConfig, apply=apply, kind="acceleration",
                      needs_training_text=lambda config: config.draft is None)  # fmt: skip
