"""Prompt-lookup decoding: guesses copied from the prompt and the output so far, checked by the model.

A decoding stage with no draft model (Saxena 2023, "prompt lookup decoding"; transformers'
`prompt_lookup_num_tokens`): the newest n-gram (n from `max_ngram` down to `min_ngram`) is looked
up in everything before it, and the `k` tokens that followed its latest occurrence are the
guesses, checked in one forward of the model (runtime/decoding). Lossless for greedy decoding.
Pays where the output repeats its input: code, editing, extraction, retrieval-grounded answers;
on free prose few guesses are kept and a round costs a little more than a step. The benchmark
measures it on prompts from the evaluation text and states how many guesses were kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from frugalm.runtime import decoding
from frugalm.techniques.base import Context, Technique, check_config, record_change
from frugalm.techniques.speculative import check_decodable, set_decoding


@dataclass(frozen=True, kw_only=True)
class PromptLookupConfig:
    k: int = 4
    """Tokens guessed per round (those that followed the matched n-gram)."""
    max_ngram: int = 3
    """Longest n-gram matched (longer matches are tried first)."""
    min_ngram: int = 1
    """Shortest n-gram matched before a round goes without guesses."""

    def problems(self) -> list[str]:
        problems = []
        if self.k < 1:
            problems.append(f"k must be at least 1 guess per round (e.g. 4), got {self.k}")
        if self.min_ngram < 1 or self.max_ngram < self.min_ngram:
            problems.append(
                f"need 1 <= min_ngram <= max_ngram (e.g. 1 and 3), got min_ngram {self.min_ngram}, max_ngram {self.max_ngram}"
            )
        return problems


def apply(model: nn.Module, config: PromptLookupConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    check_decodable(model, name)
    setting = {"method": "prompt_lookup", "k": config.k, "max_ngram": config.max_ngram, "min_ngram": config.min_ngram}
    set_decoding(model, setting)
    record_change(ctx, name, [], 0, model, inference={decoding.SETTING: setting})
    return model


TECHNIQUE = Technique(name="prompt_lookup", config_cls=PromptLookupConfig, apply=apply, kind="acceleration")
