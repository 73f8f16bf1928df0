"""A model cascade a variant carries: its small model, and when an answer goes to the large one.

Tabi (Wang et al. 2023, "Tabi: An Efficient Multi-Level Inference System for Large Language
Models") lets a small model answer and escalates to the large one only when the small one is
unsure. The variant is the large model; the small model travels inside its artifact (`cascade/`,
a variant folder of its own, like a speculative draft) and `load_model` attaches it. A task item
goes to the large model when the small model's confidence in its answer is below `tau`.

Confidence of an answer, each in [0, 1], higher is surer (the cascade stage measures which one
separates right from wrong answers best, and records it):
- `max_prob`: the probability of the answer (multiple choice: of the chosen option among the
  options; a completion: of the whole greedy completion, the product over its tokens);
- `margin`: the gap between the best and the second-best probability (for a completion, the
  smallest gap over its tokens);
- `entropy`: 1 - the entropy of the distribution over the options (over the vocabulary, averaged
  over the completion's tokens) divided by its maximum.
"""

from __future__ import annotations

from torch import nn

SETTING = "cascade"
DIR = "cascade"
CONFIDENCES = ("max_prob", "margin", "entropy")
_ATTR = "frugalm_cascade_small"


def attach(model: nn.Module, small: nn.Module) -> None:
    """Keep `small` with `model` without making it a submodule (it is saved in its own folder)."""
    model.__dict__[_ATTR] = small


def small_of(model: nn.Module) -> nn.Module | None:
    return model.__dict__.get(_ATTR)


def escalate(confidence: list[float], tau: float) -> list[bool]:
    """Per item: whether the large model answers (the small model's confidence is below tau)."""
    return [c < tau for c in confidence]
