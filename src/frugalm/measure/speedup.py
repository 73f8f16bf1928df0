"""Speedups of a model over a reference, timed side by side in one process (see measure/paired.py).

For each workload two calls are built per model, on the workload's batch and seeded prompt:
- prefill: the prompt's forward pass with a fresh cache (the time to first token, but for one argmax);
- decode: DECODE_STEPS greedy steps from the prompt's cache, which is then restored, so every call
  decodes the same positions. A cache that can be cropped (transformers' DynamicCache) is cropped
  back; one that cannot (a packed quantized cache) is rebuilt from a deep copy of the prefilled
  one, and then both models restore that way so the copy's cost hits both sides alike.
`speedup_prefill` and `speedup_decode` are time(reference) / time(model): above 1 the model is
faster. Both models are held by this one process; the protocol says so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from frugalm.measure import compute
from frugalm.measure.metrics import Measurement
from frugalm.measure.paired import PairedConfig, machine_conditions, time_paired
from frugalm.measure.workloads import Workload

DECODE_STEPS = 8
"""Decode steps per timed call (fewer when the workload generates fewer tokens)."""


def _prefill_call(model, ids: torch.Tensor, make_cache) -> Callable[[], None]:
    kw = compute.forward_kwargs(model)

    def run() -> None:
        with torch.no_grad():
            model(ids, past_key_values=make_cache() if make_cache else None, use_cache=True, **kw)

    return run


def _decode_call(model, ids: torch.Tensor, make_cache, steps: int, deep_copy: bool) -> Callable[[], None]:
    kw = compute.forward_kwargs(model)
    with torch.no_grad():
        out = model(ids, past_key_values=make_cache() if make_cache else None, use_cache=True, **kw)
    template, first = out.past_key_values, out.logits[:, -1:].argmax(-1)  # first: (batch, 1)
    state = {"cache": copy.deepcopy(template) if deep_copy else template}

    def run() -> None:
        cache, nxt = state["cache"], first
        with torch.no_grad():
            for _ in range(steps):
                nxt = model(nxt, past_key_values=cache, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        if deep_copy:
            state["cache"] = copy.deepcopy(template)
        else:
            cache.crop(-steps)  # back to the prompt's positions

    return run


def _can_crop(make_cache) -> bool:
    return make_cache is None  # transformers' DynamicCache; the packed quantized cache cannot crop


def speedups(model, reference, workloads: list[Workload], device, config: PairedConfig, *, model_cache=None,
             reference_cache=None, emit=None) -> list[Measurement]:  # fmt: skip
    """speedup_prefill and speedup_decode of `model` over `reference` on each workload, with 95% intervals."""
    deep_copy = not (_can_crop(model_cache) and _can_crop(reference_cache))
    sync = (lambda: compute.synchronize(device)) if device.type == "cuda" else None
    out = []
    for w in workloads:
        ids = compute.prompt_ids(model, w.batch_size, w.prompt_tokens, device)
        steps = max(1, min(DECODE_STEPS, w.output_tokens - 1))
        pairs = {
            "speedup_prefill": (_prefill_call(model, ids, model_cache), _prefill_call(reference, ids, reference_cache)),
            "speedup_decode": (
                _decode_call(model, ids, model_cache, steps, deep_copy),
                _decode_call(reference, ids, reference_cache, steps, deep_copy),
            ),
        }
        for metric, (run_model, run_reference) in pairs.items():
            if emit:
                emit(f"{metric} on {w.name} (paired with the reference)", 0, 1)
            for fn in (run_model, run_reference, run_model, run_reference):  # warm-up: allocator, kernel packing
                fn()
            before = machine_conditions(torch.get_num_threads())
            result = time_paired(run_model, run_reference, config, sync=sync)
            after = machine_conditions(torch.get_num_threads())
            protocol = {
                **result.protocol(config),
                "call": f"prompt forward, batch {w.batch_size} x {w.prompt_tokens} tokens, fresh cache"
                if metric == "speedup_prefill"
                else f"{steps} greedy decode steps at batch {w.batch_size} from the {w.prompt_tokens}-token prompt's cache, "
                f"restored by {'deep copy (timed, both sides)' if deep_copy else 'crop'}",
                "models": "model and reference held by one measuring process",
                "ratio": "time(reference) / time(model)",
                "spread": "half the 95% interval's width",
                "samples": "per-block ratios",
                "conditions_before": before,
                "conditions_after": after,
            }
            out.append(
                Measurement(
                    metric,
                    result.speedup,
                    method="measured",
                    workload=w.name,
                    n=result.n_blocks,
                    spread=(result.ci_high - result.ci_low) / 2,
                    protocol=protocol,
                    samples=[math.exp(d) for d in result.block_log_ratios],
                )  # fmt: skip
            )
    return out
