"""Speedups of a model over a reference, timed side by side in one process (see measure/paired.py).

For each workload two calls are built per model, on the workload's batch and seeded prompt:
- ttft: the prompt's forward pass with a fresh cache and the first token's argmax, which is what
  the time to first token (ttft_*) times: the prefill speedup;
- decode: one greedy step from the prompt's cache, which is then cropped back, so every call
  decodes the same position (transformers' DynamicCache, the packed quantized cache and the
  compiled path's static cache all crop without copying). A recurrent model's state (RWKV,
  Mamba) cannot be rewound and moves on one token per call: its step costs the same at any
  position.
One step per call keeps the calls short, so the ABBA samples of the two models follow each
other closely and a burst of contention on the shared machine lands on both (measured on a
2-core VM: one-step calls reached a +-0.8% interval in 60 s where 8-step calls needed minutes
for +-3%); a tiny model's step is repeated up to the minimum sample duration instead.
`speedup_ttft` and `speedup_decode` are time(reference) / time(model): above 1 the model is
faster. Both models are held by this one process; the protocol says so.

Energy and money per token are time per token priced by the same power model and hourly price,
so their ratios follow from the decode speedup: `energy_ratio_decode` and `cost_ratio_decode` =
1 / speedup_decode, assuming both models draw the same power on the same cores (estimated, and
labelled so; below 1 the model saves).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from frugalm.measure import compute
from frugalm.measure.metrics import Measurement
from frugalm.measure.paired import PairedConfig, competition, machine_conditions, time_paired
from frugalm.measure.workloads import Workload
from frugalm.runtime import decoding, families, prompt_pruning

SPEEDUP_METRICS = ("speedup_ttft", "speedup_decode")
DERIVED_RATIOS = {"energy_ratio_decode": "energy", "cost_ratio_decode": "money"}


def ttft_call(model, ids: torch.Tensor, make_cache) -> Callable[[], None]:
    kw = compute.forward_kwargs(model)
    tokens = ids.shape[1] + 1

    def run() -> None:
        with torch.no_grad():
            pruned = prompt_pruning.pruned(model, ids)  # a variant that prunes its prompts does it in its TTFT
            out = model(pruned, past_key_values=make_cache(tokens) if make_cache else None, use_cache=True, **kw)
            out.logits[:, -1].argmax(-1)

    return run


def decode_call(model, ids: torch.Tensor, make_cache, max_tokens: int | None = None) -> Callable[[], None]:
    """`max_tokens`: what the cache is made for (a static cache attends over all of it), by default the prompt and one step."""
    kw = compute.forward_kwargs(model)
    cache = make_cache(max_tokens or ids.shape[1] + 1) if make_cache else None
    with torch.no_grad():
        out = model(prompt_pruning.pruned(model, ids), past_key_values=cache, use_cache=True, **kw)
    cache, first = out.past_key_values, out.logits[:, -1:].argmax(-1)  # first: (batch, 1)

    def run() -> None:
        with torch.no_grad():
            model(first, past_key_values=cache, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        families.step_back_(cache)  # back to the prompt's positions (a recurrent state just moves on)

    return run


GENERATION_CALL = ("A: one whole batch-1 greedy generation of the workload's output tokens with the variant's decoding "
                   "strategy, from the next of its evaluation-text prompts (prefill included), fresh cache")  # fmt: skip


def generation_call(model, w: Workload, prompts: list[torch.Tensor], make_cache, strategy) -> Callable[[], None]:
    """One whole generation per call, from the next prompt in turn: with `strategy` (compute.Strategy), or plain greedy.

    A and B each cycle through the same prompts from the first, so the samples of one ABBA
    block decode the same prompts."""
    tokens = w.prompt_tokens + w.output_tokens
    turn = iter(range(1 << 62))

    def run() -> None:
        ids = prompts[next(turn) % len(prompts)]
        cache = make_cache(tokens) if make_cache else None
        if strategy is not None:
            strategy.generate(model, ids, w.output_tokens, cache=cache, stats=decoding.DecodeStats())
        else:
            decoding.generate(model, ids, w.output_tokens, cache=cache)

    return run


def paired_figure(metric: str, w: Workload, run_a, run_b, config: PairedConfig, device, call: str) -> Measurement:
    """`metric` = time(B) / time(A), timed in ABBA blocks after two warm-up calls each, with its 95% interval."""
    sync = (lambda: compute.synchronize(device)) if getattr(device, "type", None) == "cuda" else None
    for fn in (run_a, run_b, run_a, run_b):  # warm-up: allocator, kernel packing
        fn()
    before = machine_conditions(torch.get_num_threads())
    result = time_paired(run_a, run_b, config, sync=sync)
    after = machine_conditions(torch.get_num_threads())
    protocol = {
        **result.protocol(config),
        "call": call,
        "models": "both held by one measuring process",
        "ratio": "time(B) / time(A)",
        "spread": "half the 95% interval's width",
        "samples": "per-block ratios",
        "conditions_before": before,
        "conditions_after": after,
        **competition(before, after),
    }
    return Measurement(metric, result.speedup, method="measured", workload=w.name, n=result.n_blocks,
                       spread=(result.ci_high - result.ci_low) / 2, protocol=protocol,
                       samples=[math.exp(d) for d in result.block_log_ratios])  # fmt: skip


def speedups(model, reference, workloads: list[Workload], device, config: PairedConfig, *, model_cache=None,
             reference_cache=None, emit=None, strategies: dict | None = None) -> list[Measurement]:  # fmt: skip
    """speedup_ttft and speedup_decode of `model` (A) over `reference` (B) on each workload, with
    95% intervals, and the energy and cost ratios derived from the decode speedup.

    Where the model decodes with a strategy (`strategies[workload]`, batch 1), one decode step says
    nothing of its speed: speedup_decode times whole generations instead, the model's with its
    strategy against the reference's plain greedy ones from the same text prompts."""
    out = []
    for w in workloads:
        ids = compute.prompt_ids(model, w.batch_size, w.prompt_tokens, device)
        strategy = (strategies or {}).get(w.name)
        pairs = {
            "speedup_ttft": (
                ttft_call(model, ids, model_cache),
                ttft_call(reference, ids, reference_cache),
                f"prompt forward and first token's argmax, batch {w.batch_size} x {w.prompt_tokens} tokens, fresh cache",
            )
        }
        if w.output_tokens > 1 and strategy is not None:
            pairs["speedup_decode"] = (
                generation_call(model, w, strategy.prompts, model_cache, strategy),
                generation_call(reference, w, strategy.prompts, reference_cache, None),
                f"{GENERATION_CALL}; B: the reference decoding plain greedy",
            )
        elif w.output_tokens > 1:
            pairs["speedup_decode"] = (
                decode_call(model, ids, model_cache, w.prompt_tokens + w.output_tokens),
                decode_call(reference, ids, reference_cache, w.prompt_tokens + w.output_tokens),
                f"one greedy decode step at batch {w.batch_size} from the {w.prompt_tokens}-token prompt's cache, "
                "cropped back after each call",
            )
        for metric, (run_model, run_reference, call) in pairs.items():
            if emit:
                emit(f"{metric} on {w.name} (paired with the reference)", 0, 1)
            figure = paired_figure(metric, w, run_model, run_reference, config, device, call)
            figure.protocol.update(
                models="model and reference held by one measuring process", ratio="time(reference) / time(model)"
            )
            out.append(figure)
            if metric == "speedup_decode":
                out += derived_ratios(figure)
    return out


def derived_ratios(decode: Measurement) -> list[Measurement]:
    """Energy and cost per token of the model over the reference's: 1 / speedup_decode, interval inverted."""
    low, high = decode.protocol["ci"]
    ci = [1 / high, 1 / low if low > 0 else math.inf]
    protocol = {
        "from": "speedup_decode",
        "ratio": "energy (or cost) per token of the model / the reference's = time(model) / time(reference)",
        "assumes": "both draw the same power on the same cores (the power model, or the hardware counter's "
        "average, is the same for both), so energy and money per token scale with time per token",
        "confidence": decode.protocol["confidence"],
        "ci": ci,
        "spread": "half the 95% interval's width",
        "met_target": decode.protocol["met_target"],
    }
    return [
        Measurement(
            name,
            1 / decode.value,
            method="estimated",
            workload=decode.workload,
            n=decode.n,
            spread=(ci[1] - ci[0]) / 2,
            protocol=protocol,
        )  # fmt: skip
        for name in DERIVED_RATIOS
    ]
