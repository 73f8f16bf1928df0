"""Figures of the variants that run differently from a plain forward: decoding strategies and offloading.

Decoding strategies (runtime/decoding) apply at batch 1 and depend on what is decoded, so a
workload's generations start from prompts of the evaluation text (`strategy_for`); besides the
workload's usual timings the child stores their counts and agreement with plain greedy decoding
(`strategy_figures`) and the paired speedup over the same weights decoding plainly
(`strategy_speedups`). An offloaded variant (runtime/offload) adds the bytes one decode step reads
from its weight files and the step timed with them evicted from the page cache (`offload_figures`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from frugalm.measure import compute, memory
from frugalm.measure.compute import Strategy, text_prompts
from frugalm.measure.metrics import Measurement
from frugalm.measure.paired import PairedConfig
from frugalm.measure.speedup import GENERATION_CALL, decode_call, generation_call, paired_figure
from frugalm.measure.stats import percentile, spread
from frugalm.measure.workloads import Workload
from frugalm.runtime import decoding, offload
from frugalm.runtime.modules import inference_settings

Emit = Callable[[str, int, int], None]


def strategy_for(lm, w: Workload, docs: list[str]) -> Strategy | None:
    """The loaded variant's decoding strategy for workload `w`, with prompts from `docs`; None where it decodes plainly."""
    setting = lm.inference.get(decoding.SETTING)
    if not setting or w.batch_size != 1 or w.output_tokens < 2:
        return None
    prompts = text_prompts(lm.tokenizer, docs, w.prompt_tokens, lm.device)
    return Strategy(setting, decoding.proposer_for(lm.model, setting), prompts)


def strategy_speedups(model, workloads: list[Workload], strategies: dict, config: PairedConfig, device, kv_cache,
                      emit: Emit) -> list[Measurement]:  # fmt: skip
    """speedup_strategy per workload with a strategy: its generations against the same model's plain ones."""
    out = []
    for w in workloads:
        strategy = strategies[w.name]
        if strategy is None:
            continue
        emit(f"speedup_strategy on {w.name} (paired with plain greedy decoding)", 0, 1)
        plain = generation_call(model, w, strategy.prompts, kv_cache, None)
        out.append(paired_figure("speedup_strategy", w, generation_call(model, w, strategy.prompts, kv_cache, strategy),
                                 plain, config, device, f"{GENERATION_CALL}; B: the same model decoding plain greedy"))  # fmt: skip
    return out


def offload_figures(model, workloads: list[Workload], folder: Path, device, kv_cache, emit: Emit, steps: int = 5) -> list[Measurement]:  # fmt: skip
    """Per workload: bytes read from the weight files by one decode step (counted), and the step timed cold."""
    plan = offload.plan_of(model)
    out = []
    for w in workloads:
        if w.output_tokens < 2:
            continue
        emit(f"offloaded decode on {w.name} (cold page cache)", 0, steps)
        ids = compute.prompt_ids(model, w.batch_size, w.prompt_tokens, device)
        step = decode_call(model, ids, kv_cache, w.prompt_tokens + w.output_tokens)
        step()
        before = offload.bytes_read(model)
        step()
        read = offload.bytes_read(model) - before
        cold = []
        for i in range(steps):
            evicted = offload.evict(folder)
            t = time.perf_counter()
            step()
            cold.append((time.perf_counter() - t) * 1e3)
            emit(f"offloaded decode on {w.name} (cold page cache)", i + 1, steps)
        p = {"workload": w.to_dict(), "plan": plan, "folder": str(folder)}
        out += [
            Measurement("offload_read_mib_per_tok", read / memory.MIB, method="counted", workload=w.name,
                        protocol={**p, "counted": "bytes returned by accelerate's weight loader during one decode step"}),
            Measurement("tpot_cold_ms", percentile(cold, 50), method="measured", workload=w.name, n=steps, spread=spread(cold),
                        samples=cold, protocol={**p, "evicted_bytes": evicted, "cold": "the weight files evicted from the OS "
                        "page cache (posix_fadvise DONTNEED) before every step; one step from the prompt's cache, cropped back"}),
        ]  # fmt: skip
    return out


def decoding_protocol(model, w: Workload, strategy: Strategy | None) -> dict:
    setting = inference_settings(model).get(decoding.SETTING)
    if not setting:
        return {}
    if strategy is None:
        return {"decoding": f"plain greedy: the variant's {setting['method']} decoding runs at batch 1 only"}
    return {"decoding": setting, "prompts": f"{len(strategy.prompts)} prompts of {w.prompt_tokens} tokens from the evaluation text, one per repetition in turn",
            "decode_step": "a round's time shared equally by the tokens it produced"}  # fmt: skip


def strategy_figures(model, w: Workload, strategy: Strategy, kv_cache, wp: dict) -> list[Measurement]:
    """Counts of the timed generations, and their agreement with the same model's plain greedy output."""
    stats, agree, total = strategy.stats, 0, 0
    for i, got in enumerate(strategy.outputs):
        cache = kv_cache(w.prompt_tokens + w.output_tokens) if kv_cache else None
        plain = decoding.generate(
            model, strategy.prompt(i), w.output_tokens, cache=cache
        )  # timed runs: prompts 0, 1, ...
        agree += sum(a == b for a, b in zip(got, plain))
        total += len(plain)
    p = {**wp, "generations": len(strategy.outputs), "generated_tokens": stats.generated, "rounds": stats.rounds,
         "guesses": stats.drafted, "kept": stats.accepted, "target_forwards": stats.target_forwards,
         "draft_forwards": stats.draft_forwards, "blocks_per_token": stats.blocks_per_tok}  # fmt: skip
    out = [
        Measurement("target_fwd_per_tok", stats.target_fwd_per_tok, method="counted", workload=w.name, protocol=p),
        Measurement("greedy_agree_frac", agree / total, method="measured", workload=w.name, n=len(strategy.outputs),
                    protocol={**p, "compared": "position by position with plain greedy decoding of the same model and prompts"}),
    ]  # fmt: skip
    if stats.drafted:
        out += [
            Measurement("accept_rate", stats.accept_rate, method="counted", workload=w.name, protocol=p),
            Measurement("accept_len_mean", stats.accept_len_mean, method="counted", workload=w.name, protocol=p),
        ]
    return out
