"""Prompt pruning (Selective Context: Li et al. 2023, arXiv:2310.06201): the variant drops its prompts' least informative tokens.

An acceleration stage: the weights stay as they come; the variant records a pruning setting and
prunes every prompt before its prefill (runtime/prompt_pruning): the tokens its own first
`scorer_layers` blocks find most predictable (lowest self-information) go, `ratio` of them. The
prefill then runs on fewer tokens, at the cost of the scorer's pass over the whole prompt and of
whatever the dropped tokens carried: the benchmark counts both (flops_per_tok_prefill per token of
the prompt given, the scorer included; time to first token with the pruning inside) and scores
the tasks from pruned contexts, paired against the unpruned model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime import prompt_pruning
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.techniques._arch import decoder_blocks
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class PromptPruningConfig:
    ratio: float = 0.3
    """Fraction of each prompt's tokens dropped (the first and last are always kept)."""
    scorer_layers: int = 1
    """Decoder blocks of the model's own that score the tokens (0: embedding and head alone)."""
    keep_recent: int = 32
    """The prompt's last tokens, never dropped (the ratio is taken from the tokens before them)."""

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.ratio < 1:
            out.append(f"ratio must be in (0, 1) (the fraction of prompt tokens dropped, e.g. 0.3), got {self.ratio}")
        if self.scorer_layers < 0:
            out.append(f"scorer_layers must be >= 0, got {self.scorer_layers}")
        if self.keep_recent < 1:
            out.append(f"keep_recent must be >= 1 (the last token is always kept), got {self.keep_recent}")
        return out


def apply(model: nn.Module, config: PromptPruningConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    found = decoder_blocks(model)
    if found is None:
        raise TechniqueError(f"{name}: found no decoder blocks in {type(model).__name__} to score the prompt with")
    path, blocks = found
    if config.scorer_layers >= len(blocks):
        raise TechniqueError(
            f"{name}: scorer_layers {config.scorer_layers} is not fewer than the model's {len(blocks)} blocks; a scorer as large as the model saves nothing"
        )
    if inference_settings(model).get(prompt_pruning.SETTING):
        raise TechniqueError(f"{name}: this variant already prunes its prompts")
    setting = {"ratio": config.ratio, "scorer_layers": config.scorer_layers, "keep_recent": config.keep_recent,
               "blocks": path}  # fmt: skip
    setattr(model, INFERENCE_ATTR, {**inference_settings(model), prompt_pruning.SETTING: setting})
    record_change(ctx, name, [], 0, model, inference={prompt_pruning.SETTING: setting})
    return model


TECHNIQUE = Technique(name="prompt_pruning", config_cls=PromptPruningConfig, apply=apply, kind="acceleration")
