"""The benchmark proper, as run inside the measuring child: one model -> a list of Measurements.

The measurement code never changes a model. Order matters only for memory hygiene: static
counts first, then quality passes, then each workload with the peak-memory mark reset.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import frugalm
from frugalm.errors import ConfigError, ModelError
from frugalm.measure import compute, memory, moe, network
from frugalm.measure.compute import Strategy
from frugalm.measure.cost import HardwareProfile, grams_co2e, usd
from frugalm.measure.energy import EnergyMeter
from frugalm.measure.metrics import BENCHMARK_VERSION, METRICS, Measurement
from frugalm.measure.overhead import decode_overhead, overhead_skip_reason, shrunk_twin
from frugalm.measure.paired import PairedConfig, competition, machine_conditions
from frugalm.measure.quality import PerplexityProtocol, measure_quality
from frugalm.measure.speedup import SPEEDUP_METRICS, speedups
from frugalm.measure.stats import percentile, spread
from frugalm.measure.strategies import (
    decoding_protocol,
    offload_figures,
    strategy_figures,
    strategy_for,
    strategy_speedups,
)
from frugalm.measure.tasks import TaskProtocol, measure_tasks
from frugalm.measure.workloads import Workload
from frugalm.models import context_length, load_model
from frugalm.runtime import cascade, compiled, decoding, families, offload, prompt_pruning
from frugalm.runtime.kv_cache import cache_factory
from frugalm.runtime.kv_cache import kernel as kv_kernel
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings, kernel_summary
from frugalm.runtime.quant_linear import format_summary

Emit = Callable[[str, int, int], None]


@dataclass
class BenchSpec:
    """Everything the child needs, as plain data (it travels as JSON)."""

    model_ref: str
    model_path: str
    device: str
    dtype: str
    docs: list[str]
    data_desc: dict
    workloads: list[dict]
    profile: dict
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    reference_path: str | None = None
    threads: int | None = None
    """Torch threads to run with (None: torch's default)."""
    cpus: list[int] = field(default_factory=list)
    """Cores to run on (empty: all allowed)."""
    paired: dict | None = None
    """PairedConfig as a dict: time speedups against the reference; None: no speedups."""
    speedup_workloads: list[str] = field(default_factory=list)
    """Workloads the speedups are timed on (empty: all)."""
    compile_decode: bool = False
    """Install the compiled decode path (runtime/compiled) on the model measured."""
    attn_implementation: str | None = None
    """Attention kernel the model and its reference load with (None: transformers' default)."""
    protocol: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    """TaskProtocol as a dict, its tasks named (no task: none scored)."""
    reference_scores: dict = field(default_factory=dict)
    """{task: the reference's item scores} from an earlier run (api.reference_score_keys); the child
    adds the tasks it scores the reference on and sends the dict back for the store."""
    warmup: int = 1
    repetitions: int = 5


def _want(spec: BenchSpec, resource: str) -> bool:
    return any(METRICS[m].resource == resource for m in spec.metrics)


def interpreter_baseline(model_path: str) -> int:
    """RSS of this process with everything but the model in memory: torch, transformers, the
    model's own code module (importing it alone costs ~100 MB) and torch's thread pools."""

    config = AutoConfig.from_pretrained(model_path)
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the modeling module
    torch.ones(64, 64) @ torch.ones(64, 64)
    return memory.current_rss_bytes()


def measure_model(spec: BenchSpec, emit: Emit) -> tuple[list[Measurement], int]:
    """All selected metrics of the spec's model, and the interpreter baseline RSS (bytes)."""

    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    baseline_rss = interpreter_baseline(spec.model_path)
    emit("loading model", 0, 1)
    lm = load_model(spec.model_path, device=spec.device, dtype=spec.dtype, attn_implementation=spec.attn_implementation)
    if spec.compile_decode and lm.inference.get("kv_cache"):
        raise ConfigError(
            "--compile: this variant quantizes its KV cache (kv_cache_quant), whose packed cache cannot be static; bench it without --compile"
        )
    if spec.compile_decode and not lm.inference.get(compiled.SETTING):
        lm.inference = {**lm.inference, compiled.SETTING: {"mode": "default"}}
        setattr(lm.model, INFERENCE_ATTR, lm.inference)
        compiled.install(lm.model, lm.inference[compiled.SETTING])
    emit("loading model", 1, 1)
    out = _static(lm.model, Path(spec.model_path), spec)
    profile = HardwareProfile(**spec.profile)

    kv_cache = cache_factory(lm.model, lm.inference)  # the artifact's quantized KV cache, if it has one
    workloads = [Workload.from_dict(wd) for wd in spec.workloads]
    strategies = {w.name: strategy_for(lm, w, spec.docs) for w in workloads}  # the variant's decoding strategy, batch 1
    # Workloads before the quality passes: those allocate large logits tensors whose freed
    # memory the allocator may keep, and that would count in the next peak.
    for w in workloads:
        out += _workload(lm.model, w, lm.device, spec, profile, baseline_rss, emit, kv_cache, strategies[w.name])
    if offload.plan_of(lm.model) is not None:
        out += offload_figures(lm.model, workloads, Path(spec.model_path), lm.device, kv_cache, emit)
    if spec.paired:
        out += strategy_speedups(
            lm.model, workloads, strategies, PairedConfig(**spec.paired), lm.device, kv_cache, emit
        )
    want_speedups = bool(spec.paired and spec.reference_path) and any(m in spec.metrics for m in SPEEDUP_METRICS)
    # Not for a compiled decode step: the twin would need its own compilation (as long as the model's).
    if ("decode_overhead_frac" in spec.metrics and not want_speedups and not lm.inference.get(compiled.SETTING)
            and offload.plan_of(lm.model) is None):  # fmt: skip
        out += _overhead(lm.model, spec, lm.device, kv_cache, emit)
    # The reference is loaded only now, so that its memory never counts in the workloads' peaks.
    ref = None
    if spec.reference_path and (_want(spec, "quality") or want_speedups):
        ref = load_model(spec.reference_path, device=spec.device, dtype=spec.dtype,
                         attn_implementation=spec.attn_implementation)  # fmt: skip
        _check_same_tokenizer(lm.tokenizer, ref.tokenizer, spec.reference_path)
    if want_speedups:
        timed = [w for w in workloads if not spec.speedup_workloads or w.name in spec.speedup_workloads]
        out += speedups(lm.model, ref.model, timed, lm.device, PairedConfig(**spec.paired), model_cache=kv_cache,
                        reference_cache=cache_factory(ref.model, ref.inference), emit=emit, strategies=strategies)  # fmt: skip
    if compiled.compile_log(lm.model):
        out.append(_compile_time(lm.model))
    if _want(spec, "quality"):
        out += _quality(lm, ref, spec, emit)
    if "expert_load_cv" in spec.metrics and families.family(lm.model) == "moe" and spec.docs:
        emit("expert load over the evaluation text", 0, 1)
        out += moe.load_balance(lm.model, lm.tokenizer, spec.docs, PerplexityProtocol(**spec.protocol), spec.data_desc)
    return [m for m in out if m.metric in spec.metrics], baseline_rss


def _compile_time(model) -> Measurement:
    log = compiled.compile_log(model)
    return Measurement(
        "compile_s",
        sum(r["first_call_s"] for r in log),
        method="measured",
        n=len(log),
        protocol={
            "what": "wall time of the first call of each compiled graph and shape: compilation plus one decode step "
            "(compile_decode: per batch and cache length) or one round of draft guesses (speculative's compiled draft: "
            "per k and cache length)",
            "shapes": log,
            "mode": inference_settings(model).get(compiled.SETTING, {}).get("mode", "default"),
            "paid": "once per serving process and shape (inductor's on-disk cache shortens later compilations)",
        },
    )


def _overhead(model, spec: BenchSpec, device, kv_cache, emit: Emit) -> list[Measurement]:
    """decode_overhead_frac per workload: the model's decode step timed against a width-shrunk twin's (measure/overhead.py)."""
    twin = shrunk_twin(model)
    if twin is None:
        emit(f"decode overhead skipped: {overhead_skip_reason(model)}", 1, 1)
        return []
    out = []
    for wd in spec.workloads:
        w = Workload.from_dict(wd)
        if w.output_tokens > 1:
            emit(f"decode overhead on {w.name} (paired with a width-shrunk twin)", 0, 1)
            out.append(decode_overhead(model, twin, w, device, model_cache=kv_cache))
    return out


def _static(model, folder: Path, spec: BenchSpec) -> list[Measurement]:
    mib = memory.MIB
    draft = decoding.draft_of(model)
    draft_bytes = memory.weights_bytes(draft) if draft is not None else 0
    small = cascade.small_of(model)
    small_bytes = memory.weights_bytes(small) if small is not None else 0
    out = [
        Measurement(
            "params_count", memory.params_count(model), method="counted", protocol={"tied_weights": "counted once"}
        ),
        Measurement(
            "weights_mib",
            (memory.weights_bytes(model) + draft_bytes + small_bytes) / mib,
            method="counted",
            protocol={
                "what": "parameters and buffers in memory",
                "dtype": spec.dtype,
                **({"offload": offload.plan_of(model)} if offload.plan_of(model) else {}),
                **(
                    {"draft_mib": draft_bytes / mib, "draft": "the speculative draft model's, included"}
                    if draft
                    else {}
                ),
                **(
                    {"cascade_small_mib": small_bytes / mib, "cascade": "the cascade's small model's, included"}
                    if small
                    else {}
                ),
            },
        ),
        Measurement(
            "artifact_mib", memory.folder_bytes(folder) / mib, method="counted", protocol={"folder": str(folder)}
        ),
        *([moe.active_params_figure(model)] if families.family(model) == "moe" else []),
    ]
    if _want(spec, "network"):
        files = network.artifact_files(folder)
        out += [
            Measurement(
                "ship_mib", sum(f.stat().st_size for f in files) / mib, method="counted", protocol={"files": len(files)}
            ),
            Measurement(
                "ship_compressed_mib",
                network.compressed_bytes(folder) / mib,
                method="counted",
                protocol={"codec": "zlib level 6 per file"},
            ),
        ]
    return out


def _quality(lm, ref, spec: BenchSpec, emit: Emit) -> list[Measurement]:
    reference = ref.model if ref is not None else None
    protocol = PerplexityProtocol(**spec.protocol)
    desc = {**spec.data_desc, "reference": spec.reference_path}
    out = measure_quality(
        lm.model,
        lm.tokenizer,
        spec.docs,
        protocol,
        context=context_length(lm.model.config),
        data_desc=desc,
        reference=reference,
        progress=emit,
    )
    tasks = TaskProtocol(**{**spec.tasks, "tasks": tuple(spec.tasks.get("tasks") or ())})
    if tasks.tasks:
        out += measure_tasks(lm.model, lm.tokenizer, spec.docs, tasks, data_desc=desc,
                             context=context_length(lm.model.config), reference=reference,
                             reference_scores=spec.reference_scores, progress=emit)  # fmt: skip
    return out


def _check_same_tokenizer(tok, ref_tok, ref_path: str) -> None:

    if tok.get_vocab() != ref_tok.get_vocab():
        raise ModelError(
            f"reference model '{ref_path}' has a different tokenizer; fidelity (KL, top-1 agreement) needs the same vocabulary: pass a reference with the same tokenizer"
        )


def _workload(
    model, w: Workload, device, spec: BenchSpec, profile: HardwareProfile, baseline_rss: int, emit: Emit, kv_cache=None,
    strategy: Strategy | None = None,
) -> list[Measurement]:  # fmt: skip
    label = f"workload {w.name}"

    kv = inference_settings(model).get("kv_cache")  # what kv_cache (the cache factory) builds
    wp = {
        "workload": w.to_dict(),
        "warmup": spec.warmup,
        "repetitions": spec.repetitions,
        "device": str(device),
        "dtype": spec.dtype,
        **kernel_protocol(model),
        "attn_implementation": families.attention_kernel(model),
        "kv_cache": {
            "quantized": kv,
            "kernel": kv_kernel(model, kv),
        }
        if kv
        else "DynamicCache (model dtype)",
        **decoding_protocol(model, w, strategy),
        **({"prompt_pruning": pruning} if (pruning := inference_settings(model).get(prompt_pruning.SETTING)) else {}),
    }
    out = []
    if _want(spec, "computation"):
        prefill_flops, decode_flops = compute.flops_per_token(model, w, device)
        fp = {
            **wp,
            "counter": "torch.utils.flop_counter.FlopCounterMode (+ CPU sdpa formula)",
            "context_tokens": w.prompt_tokens,
        }
        out += [
            Measurement("flops_per_tok_prefill", prefill_flops, method="counted", workload=w.name, protocol=fp),
            Measurement("flops_per_tok_decode", decode_flops, method="counted", workload=w.name, protocol=fp),
        ]
    total = spec.warmup + spec.repetitions
    progress = lambda rep: emit(label, rep, total)  # noqa: E731
    wp["conditions_before"] = machine_conditions(torch.get_num_threads())
    warm = lambda: compute.time_workload(model, w, device, warmup=spec.warmup, repetitions=0, on_rep=progress,  # noqa: E731
                                         cache_factory=kv_cache, strategy=strategy)  # fmt: skip
    # A variant that compiles (compiled decode, compiled draft rounds) does it in its warmup: the
    # compiler's transient memory is not the variant's, so that warmup runs before the peak's mark.
    compiles = bool(inference_settings(model).get(compiled.SETTING) or (strategy and strategy.setting.get("compile")))
    if compiles:
        warm()
    with memory.PeakMemory(device, baseline_rss) as peak:
        if not compiles:
            warm()
        with EnergyMeter(device, profile) as energy:
            timing = compute.time_workload(
                model,
                w,
                device,
                warmup=0,
                repetitions=spec.repetitions,
                on_rep=lambda r: progress(spec.warmup + r),
                cache_factory=kv_cache,
                strategy=strategy,
            )
    wp["conditions_after"] = machine_conditions(torch.get_num_threads())
    wp.update(competition(wp["conditions_before"], wp["conditions_after"]))
    out += _timing_measurements(w, timing, wp)
    out.append(
        Measurement(
            "peak_mem_mib",
            peak.peak_over_baseline_mib,
            method="measured",
            workload=w.name,
            protocol={**wp, **peak.protocol()},
        )
    )
    out.append(_cache_figure(model, w, timing, wp))
    out += _energy_money(model, w, spec, energy, profile, wp)
    if strategy is not None:
        out += strategy_figures(model, w, strategy, kv_cache, wp)
    return out


def _cache_figure(model, w: Workload, timing: compute.GenerationTiming, wp: dict) -> Measurement:
    """kv_cache_mib (whole batch), or for a recurrent model state_mib (per sequence: its size does not grow with the context)."""
    cached = w.prompt_tokens + w.output_tokens - 1  # the last generated token is never fed back
    if families.family(model) == "recurrent":
        return Measurement("state_mib", timing.cache_bytes[-1] / memory.MIB / w.batch_size, method="counted",
                           workload=w.name, protocol={**wp, "context_tokens_per_sequence": cached,
                           "counted": "bytes of the recurrent state's tensors after the last repetition, over the batch size"})  # fmt: skip
    return Measurement("kv_cache_mib", timing.cache_bytes[-1] / memory.MIB, method="counted", workload=w.name,
                       protocol={**wp, "cached_tokens_per_sequence": cached,
                                 "counted": "bytes of the cache's tensors after the last repetition"})  # fmt: skip


def kernel_protocol(model) -> dict:
    """What runs the linear layers: counts per kernel, quantized layers per format and kernel, and torch's quantized engine."""

    formats = format_summary(model)
    out = {"kernels": kernel_summary(model), "formats": formats}
    path = inference_settings(model).get(compiled.SETTING)
    out["decode_path"] = f"compiled (torch.compile mode {path['mode']}, static KV cache)" if path else "eager"
    if any("fbgemm" in kernels for kernels in formats.values()):
        out["quantized_engine"] = torch.backends.quantized.engine
    return out


def _summary(
    metric: str, workload: str, per_rep: list[float], protocol: dict, value: float | None = None
) -> Measurement:
    """Median of per-repetition values (unless `value` is given), their spread, and the raw samples."""
    v = percentile(per_rep, 50) if value is None else value
    return Measurement(
        metric,
        v,
        method="measured",
        workload=workload,
        n=len(per_rep),
        spread=spread(per_rep),
        protocol=protocol,
        samples=per_rep,
    )


def _timing_measurements(w: Workload, timing: compute.GenerationTiming, wp: dict) -> list[Measurement]:
    ttft_ms = [s * 1e3 for s in timing.prefill_s]
    out = [_summary(f"ttft_p{q}_ms", w.name, ttft_ms, wp, percentile(ttft_ms, q)) for q in (50, 90, 99)]
    out.append(_summary("prefill_tok_s", w.name, [w.batch_size * w.prompt_tokens / s for s in timing.prefill_s], wp))
    if w.output_tokens > 1:
        steps_ms = [[s * 1e3 for s in rep] for rep in timing.decode_step_s]
        pooled = [s for rep in steps_ms for s in rep]
        tp = {**wp, "decode_steps": len(pooled), "spread": "std of the per-repetition percentile"}
        for q in (50, 90, 99):
            per_rep = [percentile(rep, q) for rep in steps_ms]
            out.append(
                Measurement(
                    f"tpot_p{q}_ms",
                    percentile(pooled, q),
                    method="measured",
                    workload=w.name,
                    n=len(per_rep),
                    spread=spread(per_rep),
                    protocol=tp,
                    samples=pooled,
                )
            )
        tok_s = [w.batch_size * (w.output_tokens - 1) / s for s in timing.decode_s]
        out.append(_summary("decode_tok_s", w.name, tok_s, wp))
    return out


def _energy_money(
    model, w: Workload, spec: BenchSpec, energy: EnergyMeter, profile: HardwareProfile, wp: dict
) -> list[Measurement]:
    tokens = spec.repetitions * w.batch_size * w.output_tokens
    j_per_tok = energy.joules / tokens
    ep = {**wp, **energy.protocol(), "generated_tokens": tokens}
    money = usd(profile, energy.wall_s, energy.joules) / tokens * 1e6
    mp = {
        **ep,
        "profile": profile.to_dict(),
        "formula": "usd_per_hour * wall_h + usd_per_kwh * kWh, per generated token",
    }
    bparams = memory.params_count(model) / 1e9
    return [
        Measurement(
            "energy_j_per_tok", j_per_tok, method=energy.method, workload=w.name, n=spec.repetitions, protocol=ep
        ),
        Measurement(
            "carbon_g_per_mtok",
            grams_co2e(profile, j_per_tok * 1e6),
            method="estimated",
            workload=w.name,
            protocol={**ep, "gco2e_per_kwh": profile.gco2e_per_kwh, "energy_method": energy.method},
        ),
        Measurement("cost_usd_per_mtok", money, method="estimated", workload=w.name, protocol=mp),
        Measurement("cost_usd_per_mtok_per_bparam", money / bparams, method="estimated", workload=w.name, protocol=mp),
    ]


def environment(device: str) -> dict:
    """Hardware and software the figures were taken on."""

    env = {
        "benchmark_version": BENCHMARK_VERSION,
        "frugalm": frugalm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf")
        else None,
        "device": device,
        "executable": sys.executable,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
