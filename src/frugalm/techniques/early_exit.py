"""Early-exit self-speculation: the model's own first blocks guess, the whole model checks.

A decoding stage (LayerSkip's self-speculative decoding, Elhoushi et al. 2024, arXiv:2404.16710):
the first `layers` decoder blocks, followed by the model's final norm and output head, guess up
to `k` tokens greedily; the full model checks them in one forward and keeps its own greedy
output (runtime/decoding). No second model is stored: the guessing view shares every weight. It
pays only where the early layers' predictions already agree with the last layer's, which models
trained with an early-exit loss (LayerSkip) are built for; on a model trained without one, few
guesses are kept, and the benchmark's acceptance rate says so.

`mode: confidence` is the lossy kind (CALM: Schuster et al. 2022, arXiv:2207.07061): each new
token exits at the first block, from `layers` on, whose prediction through the final norm and
head reaches top probability `threshold`, and is not checked; the blocks it skips get its keys
and values from the exit's hidden state (CALM's state propagation) so later tokens see every
position. Llama-family blocks only (llama, qwen2: the propagation needs their norm and k/v
projections). Its cost in quality is measured: the benchmark scores perplexity and fidelity
token by token through the exit (runtime/decoding.exit_logits), and compares its greedy output
with the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime import compiled, decoding
from frugalm.techniques._arch import decoder_blocks, model_type
from frugalm.techniques.base import Context, Technique, check_config, record_change
from frugalm.techniques.speculative import check_decodable, set_decoding


@dataclass(frozen=True, kw_only=True)
class EarlyExitConfig:
    mode: Literal["self_speculative", "confidence"] = "self_speculative"
    """self_speculative: the first blocks guess, the whole model checks (lossless); confidence: tokens exit unchecked once confident (lossy)."""
    layers: int = 2
    """self_speculative: blocks (from the first) that guess; confidence: blocks every token runs before its first exit point. Fewer than the model has."""
    k: int = 3
    """Guesses per round (self_speculative; the most, when threshold > 0)."""
    threshold: float | None = None
    """Top probability of the exit's prediction: self_speculative stops guessing below it (default 0: never); confidence exits at or above it (default 0.9)."""
    compiled: bool = False
    """self_speculative: run each round's guessing steps as one compiled graph (runtime/decoding.CompiledDraftProposer), as speculative's `compiled`."""

    def problems(self) -> list[str]:
        problems = []
        if self.layers < 1:
            problems.append(f"layers must be at least 1 decoder block, got {self.layers}")
        if self.k < 1:
            problems.append(f"k must be at least 1 guess per round (e.g. 3), got {self.k}")
        if self.threshold is not None and not 0 <= self.threshold < 1:
            problems.append(f"threshold must be in [0, 1) (a probability), got {self.threshold}")
        if self.mode == "confidence" and self.compiled:
            problems.append(
                "compiled applies to mode self_speculative (its guessing rounds); confidence exits run eagerly"
            )
        if self.mode == "confidence" and self.threshold == 0:
            problems.append(
                "threshold 0 would exit every token at the first exit point; give a probability in (0, 1), e.g. 0.9"
            )
        return problems


CONFIDENCE_ARCHS = ("llama", "qwen2")


def apply(model: nn.Module, config: EarlyExitConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    check_decodable(model, name)
    found = decoder_blocks(model)
    if found is None:
        raise TechniqueError(f"{name}: found no decoder blocks in {type(model).__name__}; it cannot exit early")
    path, blocks = found
    if config.layers >= len(blocks):
        raise TechniqueError(
            f"{name}: layers must be fewer than the model's {len(blocks)} decoder blocks (the rest check the guesses), got {config.layers}"
        )
    if config.mode == "confidence":
        setting = _confidence_setting(model, path, config)
    else:
        setting = {"method": "early_exit", "layers": config.layers, "blocks": path, "k": config.k,
                   "threshold": config.threshold or 0.0}  # fmt: skip
        if config.compiled:
            compiled.check_fits(model, f"{name} (compiled: true)")
            setting["compile"] = True
    set_decoding(model, setting)
    record_change(
        ctx, name, [f"{path}.{i}" for i in range(config.layers)], 0, model, inference={decoding.SETTING: setting}
    )
    return model


TECHNIQUE = Technique(name="early_exit", config_cls=EarlyExitConfig, apply=apply, kind="acceleration")


def _confidence_setting(model: nn.Module, path: str, config: EarlyExitConfig) -> dict:
    if model_type(model) not in CONFIDENCE_ARCHS:
        raise TechniqueError(
            f"early_exit: mode confidence runs on Llama-family blocks ({', '.join(CONFIDENCE_ARCHS)}), not '{model_type(model)}'; use mode self_speculative"
        )
    parent = path.rpartition(".")[0]
    norm, rotary = f"{parent}.norm", f"{parent}.rotary_emb"
    for part in (norm, rotary):
        try:
            model.get_submodule(part)
        except AttributeError:
            raise TechniqueError(
                f"early_exit: found no {part} in this model; mode confidence cannot exit early here"
            ) from None
    threshold = 0.9 if config.threshold is None else config.threshold
    return {"method": "confidence_exit", "layers": config.layers, "threshold": threshold, "blocks": path, "norm": norm,
            "rotary": rotary}  # fmt: skip
