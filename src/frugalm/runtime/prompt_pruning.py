"""Prompt pruning a variant carries: drop the prompt's least informative tokens before the prefill.

Selective Context (Li et al. 2023, arXiv:2310.06201) scores each token of the prompt by its
self-information, -log p(token | the tokens before it), under a small language model, and drops the
least informative ones: what a model predicts easily adds little it could not infer. Here the
scorer is the variant's own first `scorer_layers` decoder blocks with its final norm and output
head (a weight-sharing view, runtime/decoding.layer_view; 0 blocks: embedding and head alone, a
bigram-like scorer), so nothing extra ships. The first token (the doc-start token) and the last
`keep_recent` (at least the one the next token is predicted from) are always kept; of the others,
as many of the lowest self-information as make `ratio` of the whole prompt are dropped, the rest
keep their order and close up (the pruned prompt is a new, shorter prompt). Every row of a batch
keeps the same number of tokens.

Written here: the existing packages (selective-context, LLMLingua) load their scorer from the
hub and do not run offline with transformers 5; the method itself is a few lines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.runtime.decoding import layer_view
from frugalm.runtime.modules import inference_settings

SETTING = "prompt_pruning"


def kept_count(n: int, ratio: float) -> int:
    """Tokens a prompt of `n` keeps: the first and last, and all but `ratio` of the others (rounded down)."""
    if n <= 2:
        return n
    return n - math.floor(ratio * (n - 2))


@torch.no_grad()
def prune(model: nn.Module, ids: torch.Tensor, setting: dict) -> torch.Tensor:
    """(batch, n) prompt ids -> (batch, kept_count(n)) ids: the most informative tokens, in order;
    the last `keep_recent` tokens are never dropped (the tokens just before the answer matter most)."""
    n = ids.shape[1]
    recent = max(1, setting.get("keep_recent", 1))
    drop = min(n - kept_count(n, setting["ratio"]), max(0, n - 1 - recent))
    if drop == 0:
        return ids
    scorer = layer_view(model, setting["blocks"], setting["scorer_layers"])
    logp = F.log_softmax(scorer(ids[:, : n - recent], use_cache=False).logits[:, :-1].float(), dim=-1)
    info = -logp.gather(-1, ids[:, 1 : n - recent, None]).squeeze(-1)  # self-information of tokens 1..n-recent-1
    chosen = info.topk(info.shape[1] - drop, dim=-1).indices + 1
    head = torch.zeros_like(chosen[:, :1])
    tail = torch.arange(n - recent, n, device=ids.device).expand(ids.shape[0], recent)
    return ids.gather(1, torch.cat([head, chosen.sort(-1).values, tail], dim=1))


def pruned(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`ids` as the variant prefills them: pruned when it carries prompt pruning, else unchanged."""
    setting = inference_settings(model).get(SETTING)
    return prune(model, ids, setting) if setting else ids
