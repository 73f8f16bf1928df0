"""How much of a decode step is fixed cost per step rather than work that scales with the model.

A decode step of a small model is mostly Python, operator dispatch and cache bookkeeping: the
same few hundred operator calls run whatever the widths, so a variant that halves the weights'
bytes or arithmetic can decode no faster. To say when that is so, the step is compared with the
step of a *twin*: the same architecture and depth, built from the model's config with every width
shrunk (4 dimensions per head, MLP 4x that), random weights, same batch and prompt, a float
cache. The twin runs the same operator sequence with almost no arithmetic, so

    decode_overhead_frac = twin step time / model step time

timed paired and interleaved like a speedup (measure/paired.py, one step per call from the
prompt's cache), estimates the share of the model's step that no change to its weights can
remove. Above metrics.OVERHEAD_BOUND the decode figures are overhead-bound (the report says so);
for a model whose weights stream from memory each step it is small. Estimated, not exact: the
twin keeps a little arithmetic (an upper-bound bias of about the square of the twin's width over
the model's).
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from frugalm.measure import compute
from frugalm.measure.metrics import OVERHEAD_BOUND, Measurement
from frugalm.measure.paired import PairedConfig, competition, machine_conditions, time_paired
from frugalm.measure.speedup import decode_call
from frugalm.measure.workloads import Workload
from frugalm.runtime import families

TWIN_HEAD_DIM = 4
TIMING = PairedConfig(target_halfwidth=0.05, budget_s=3.0)
"""A classification figure (overhead-bound or not): a 5% interval is plenty."""
_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size")


def overhead_skip_reason(model) -> str:
    """Why `shrunk_twin` gave no twin for this model."""
    if families.family(model) == "recurrent":
        return f"{families.describe(model)}: the twin shrinks attention heads (4 dimensions each), which a recurrent model has none of"
    return "the model's config cannot be shrunk to a twin (no num_attention_heads, or no wider than the twin)"


def shrunk_twin(model) -> torch.nn.Module | None:
    """The model's architecture at minimal width (random weights), or None where the config cannot be
    shrunk (overhead_skip_reason says why): recurrent models (RWKV, Mamba) are not shrunk."""
    if families.family(model) == "recurrent":
        return None
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
    param = next(model.parameters())
    try:
        twin = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    except (ValueError, TypeError, RuntimeError):
        return None
    return twin.to(param.device).eval()


def decode_overhead(model, twin, w: Workload, device, *, model_cache=None) -> Measurement:
    """decode_overhead_frac of `model` on workload `w`: its decode step timed against the twin's."""
    ids = compute.prompt_ids(model, w.batch_size, w.prompt_tokens, device)
    run_model = decode_call(model, ids, model_cache, w.prompt_tokens + w.output_tokens)
    run_twin = decode_call(twin, ids, None)
    for fn in (run_model, run_twin, run_model, run_twin):  # warm-up
        fn()
    before = machine_conditions(torch.get_num_threads())
    result = time_paired(run_twin, run_model, TIMING)  # time(model) / time(twin)
    after = machine_conditions(torch.get_num_threads())
    lo, hi = 1 / result.ci_high, 1 / result.ci_low
    protocol = {
        **result.protocol(TIMING),
        "ci": [lo, hi],
        "twin": {
            "head_dim": TWIN_HEAD_DIM,
            "hidden_size": twin.config.hidden_size,
            "layers": twin.config.num_hidden_layers,
            "weights": "random",
            "cache": "DynamicCache",
        },  # fmt: skip
        "call": f"one greedy decode step at batch {w.batch_size} from the {w.prompt_tokens}-token prompt's cache",
        "ratio": "time(twin) / time(model)",
        "overhead_bound_above": OVERHEAD_BOUND,
        "conditions_before": before,
        "conditions_after": after,
        **competition(before, after),
    }
    return Measurement("decode_overhead_frac", 1 / result.speedup, method="estimated", workload=w.name,
                       n=result.n_blocks, spread=(hi - lo) / 2, protocol=protocol)  # fmt: skip
