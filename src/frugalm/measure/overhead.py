"""How much of a decode step is fixed cost per step rather than work that scales with the model.

A decode step of a small model is mostly Python, operator dispatch and cache bookkeeping: the
same few hundred operator calls run whatever the widths, so a variant that halves the weights'
bytes or arithmetic can decode no faster. To say when that is so, the step is compared with the
step of a *twin*: the same architecture and depth, built from the model's config with every width
shrunk (8 dimensions per head, MLP 4x that), random weights, same batch and prompt, a float
cache. The twin runs the same operator sequence with almost no arithmetic, so

    decode_overhead_frac = median twin step time / median model step time

estimates the share of the model's step that no change to its weights can remove. Above
metrics.OVERHEAD_BOUND the decode figures are overhead-bound (the report says so); for a model
whose weights stream from memory each step it is small. Estimated, not measured exactly: the twin keeps a little
arithmetic (an upper-bound bias of roughly the twin's width over the model's, squared) and is
timed right after the model's workload, not interleaved with it.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from frugalm.measure import compute
from frugalm.measure.stats import percentile
from frugalm.measure.workloads import Workload

TWIN_HEAD_DIM = 8
_WIDTH_ATTRS = ("intermediate_size", "ffn_dim")


def shrunk_twin(model) -> torch.nn.Module | None:
    """The model's architecture at minimal width (random weights), or None where the config cannot be shrunk."""
    config = copy.deepcopy(model.config)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or not hasattr(config, "hidden_size"):
        return None
    hidden = heads * TWIN_HEAD_DIM
    if hidden >= config.hidden_size:
        return None  # the model is no wider than its twin would be
    config.hidden_size = hidden
    if getattr(config, "head_dim", None):
        config.head_dim = TWIN_HEAD_DIM
    if getattr(config, "word_embed_proj_dim", None):  # OPT
        config.word_embed_proj_dim = hidden
    for attr in _WIDTH_ATTRS:
        if getattr(config, attr, None):
            setattr(config, attr, 4 * hidden)
    try:
        twin = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    except (ValueError, TypeError, RuntimeError):
        return None
    return twin.to(next(model.parameters()).device).eval()


def twin_step_s(twin, workload: Workload, device, reps: int = 2, max_steps: int = 32) -> float:
    """Median decode-step time of the twin on the workload's batch and prompt (seconds)."""
    ids = compute.prompt_ids(twin, workload.batch_size, workload.prompt_tokens, device)
    n_new = max(2, min(workload.output_tokens, max_steps))
    steps = []
    for rep in range(reps + 1):  # the first is warm-up
        _, s = compute.generate_timed(twin, ids, n_new, device, cache=DynamicCache(config=twin.config))
        if rep:
            steps += s
    return percentile(steps, 50)
