"""Early-exit self-speculation: the model's own first blocks guess, the whole model checks.

A decoding stage (LayerSkip's self-speculative decoding, Elhoushi et al. 2024, arXiv:2404.16710):
the first `layers` decoder blocks, followed by the model's final norm and output head, guess up
to `k` tokens greedily; the full model checks them in one forward and keeps its own greedy
output (runtime/decoding). No second model is stored: the guessing view shares every weight. It
pays only where the early layers' predictions already agree with the last layer's, which models
trained with an early-exit loss (LayerSkip) are built for; on a model trained without one, few
guesses are kept, and the benchmark's acceptance rate says so.

Not here: the confidence-thresholded early exit that skips the remaining layers without checking
(lossy; it needs the skipped layers' cache entries filled, CALM's state propagation).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime import decoding
from frugalm.techniques._arch import decoder_blocks
from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.speculative import check_decodable, set_decoding


@dataclass(frozen=True, kw_only=True)
class EarlyExitConfig:
    layers: int = 2
    """Decoder blocks (from the first) that guess, followed by the final norm and head; fewer than the model has."""
    k: int = 3
    """Guesses per round (the most, when threshold > 0)."""
    threshold: float = 0.0
    """Adaptive rounds: stop guessing once the early exit's top probability falls below this (0: always k)."""

    def problems(self) -> list[str]:
        problems = []
        if self.layers < 1:
            problems.append(f"layers must be at least 1 decoder block, got {self.layers}")
        if self.k < 1:
            problems.append(f"k must be at least 1 guess per round (e.g. 3), got {self.k}")
        if not 0 <= self.threshold < 1:
            problems.append(
                f"threshold must be in [0, 1) (a probability; 0 turns adaptive rounds off), got {self.threshold}"
            )
        return problems


def apply(model: nn.Module, config: EarlyExitConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    problems = config.problems()
    if problems:
        raise TechniqueError(f"{name}: " + "; ".join(problems))
    check_decodable(model, name)
    found = decoder_blocks(model)
    if found is None:
        raise TechniqueError(f"{name}: found no decoder blocks in {type(model).__name__}; it cannot exit early")
    path, blocks = found
    if config.layers >= len(blocks):
        raise TechniqueError(
            f"{name}: layers must be fewer than the model's {len(blocks)} decoder blocks (the rest check the guesses), got {config.layers}"
        )
    setting = {
        "method": "early_exit",
        "layers": config.layers,
        "blocks": path,
        "k": config.k,
        "threshold": config.threshold,
    }
    set_decoding(model, setting)
    record_change(
        ctx, name, [f"{path}.{i}" for i in range(config.layers)], 0, model, inference={decoding.SETTING: setting}
    )
    return model


TECHNIQUE = Technique(name="early_exit", config_cls=EarlyExitConfig, apply=apply, kind="acceleration")
