"""`frugalm bench`: measure one model on the standardized benchmark and store the run.

Everything the user gave is checked here, in the parent, before a child process starts and
before anything is stored: a bad model path, text, workload, metric or profile fails fast with
one line, and leaves no trace in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers

from frugalm.assets import DEFAULT_EVAL_PATH
from frugalm.benchmark.child import BenchSpec
from frugalm.benchmark.runner import ChildCrash, Progress, run_child
from frugalm.errors import ConfigError, DataError
from frugalm.measure.cost import get_profile
from frugalm.measure.metrics import (
    BENCHMARK_VERSION,
    METRICS,
    Measurement,
    check_metric_names,
)
from frugalm.measure.paired import PairedConfig
from frugalm.measure.quality import PerplexityProtocol, describe_data
from frugalm.measure.tasks import TaskProtocol, build_items, default_tasks, items_digest
from frugalm.measure.workloads import DEFAULT_WORKLOADS, fit_to_context, get_workloads
from frugalm.models import (
    ModelSource,
    check_attn_implementation,
    check_weights,
    context_length,
    folder_identity,
    load_tokenizer,
    read_config,
    read_metadata,
    resolve_model,
    torch_device,
    torch_dtype,
)
from frugalm.runtime import decoding
from frugalm.store import Run, Store
from frugalm.text.encode import evaluated_documents
from frugalm.text.files import check_text_file


@dataclass(frozen=True)
class BenchConfig:
    """How a model is measured. The command line's options are generated from these fields (help
    from the docstrings, defaults from the defaults), so each default is defined here only."""

    data: str | None = None
    """Evaluation text, UTF-8, documents split at <|endoftext|> lines; by default (None) the built-in held-out text."""
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    """Inference workloads to run."""
    device: str = "cpu"
    """cpu or cuda[:N]."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    reference: str | None = None
    """A model with the same tokenizer to measure fidelity against (KL divergence, top-1 agreement) and speed against (speedup_ttft, speedup_decode)."""
    speedup: bool = True
    """With a reference: time the model against it in the same process, interleaved, for speedups with 95% intervals."""
    speedup_workloads: tuple[str, ...] = ()
    """Workloads to time speedups on; empty: every workload."""
    paired: PairedConfig = field(default_factory=lambda: PairedConfig(budget_s=30.0))
    """How speedups are timed: the interval's target half-width, the time budget per figure, the minimum sample duration."""
    metrics: tuple[str, ...] | None = None
    """Metrics to report; by default (None) all."""
    profile: str | None = None
    """Hardware profile for money and estimated energy; by default (None) the device type's default profile."""
    profiles_file: str | None = None
    """YAML file of extra hardware profiles."""
    protocol: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    """How quality is measured: perplexity windows, evaluated tokens, the robustness text."""
    tasks: TaskProtocol = field(default_factory=TaskProtocol)
    """Which tasks are scored (acc_cloze, acc_choice, acc_code) and how: items, context, choices, seed."""
    warmup: int = 1
    """Untimed warm-up repetitions per workload."""
    repetitions: int = 5
    """Timed repetitions per workload after warm-up."""
    scale_workloads: bool = False
    """Scale workloads longer than the model's context to fit (recorded as scaled)."""
    timeout_s: float = 3600.0
    """Seconds before the measuring child is stopped."""
    threads: int | None = None
    """Torch threads of the measuring child; by default (None) torch's own choice. Recorded with every run."""
    cpus: tuple[int, ...] = ()
    """CPU cores the measuring child may run on (its affinity); empty: every core this process may use."""
    compile: bool = False
    """Decode compiled: a static KV cache and torch.compile of the one-token step, compile time reported as compile_s (a variant made with compile_decode decodes compiled anyway)."""
    attn_implementation: str | None = None
    """Attention kernel of the model (and of its reference): eager, sdpa, or flash_attention_2 (CUDA, with flash-attn installed); by default (None) transformers' own choice. Recorded with the run and in each workload's protocol."""


@dataclass
class BenchResult:
    run: Run
    measurements: list[Measurement]


def prepare(model: str | os.PathLike | None, config: BenchConfig) -> BenchSpec:
    """Validate every input and build the child's spec. Raises FrugalmError with the fix."""
    metrics = check_metric_names(config.metrics) if config.metrics else list(METRICS)
    workloads = get_workloads(config.workloads)
    config.protocol.check()
    config.tasks.check()
    if config.repetitions < 1 or config.warmup < 0:
        raise DataError(f"repetitions must be >= 1 and warmup >= 0 (got {config.repetitions}, {config.warmup})")
    _check_threads_and_cpus(config)
    device = torch_device(config.device)
    torch_dtype(config.dtype)
    profile = get_profile(config.profile, device.type, config.profiles_file)
    source = resolve_model(model)
    model_config = read_config(source)
    context = context_length(model_config)
    fitted = [fit_to_context(w, context, scale=config.scale_workloads) for w in workloads]
    unknown = sorted(set(config.speedup_workloads) - {w.name for w in workloads})
    if unknown:
        raise ConfigError(
            f"speedup workload(s) {', '.join(unknown)} are not among the workloads measured ({', '.join(w.name for w in workloads)}); add them with --workload or drop them"
        )
    reference = resolve_model(config.reference).path if config.reference else None
    if config.attn_implementation:
        check_attn_implementation(config.attn_implementation, model_config, device)
        if config.reference:
            check_attn_implementation(config.attn_implementation, read_config(resolve_model(config.reference)), device)
    docs, data_desc = _evaluated_text(source, config, metrics)
    return BenchSpec(
        model_ref=source.ref,
        model_path=str(source.path),
        device=str(device),
        dtype=config.dtype,
        docs=docs,
        data_desc=data_desc,
        workloads=[w.to_dict() for w in fitted],
        profile=profile.to_dict(),
        metrics=metrics,
        reference_path=str(reference) if reference else None,
        paired=asdict(config.paired) if config.speedup else None,
        speedup_workloads=list(config.speedup_workloads),
        threads=config.threads,
        cpus=list(config.cpus),
        compile_decode=config.compile,
        attn_implementation=config.attn_implementation,
        protocol=asdict(config.protocol),
        tasks=asdict(_resolved_tasks(config, metrics, docs)),
        warmup=config.warmup,
        repetitions=config.repetitions,
    )


def _evaluated_text(source, config: BenchConfig, metrics: list[str]) -> tuple[list[str], dict]:
    """(the documents the child evaluates, what the protocol records about the text).

    The whole file is checked and hashed as a stream; only the documents the perplexity
    protocol evaluates (its first max_tokens tokens, which also hold the robustness text) are
    read into memory and shipped to the child, and none when no quality metric (nor the expert
    load, read over this text) is asked for and the model has no decoding strategy (whose
    generations start from prompts of this text).
    """

    path = config.data if config.data is not None else DEFAULT_EVAL_PATH
    desc = describe_data(str(config.data) if config.data is not None else None, check_text_file(path))
    # a decoding strategy generates from prompts of this text
    strategy = ((read_metadata(source.path) or {}).get("inference") or {}).get(decoding.SETTING)
    wants_text = any(METRICS[m].resource == "quality" for m in metrics) or "expert_load_cv" in metrics
    if not wants_text and not strategy:
        return [], desc
    return evaluated_documents(path, load_tokenizer(source), config.protocol.max_tokens), desc


def _resolved_tasks(config: BenchConfig, metrics: list[str], docs: list[str]) -> TaskProtocol:
    """The task protocol with its tasks named: those given, or the default set for the text less
    those it has no items for; narrowed to the metrics asked for. A task given that the text has
    no items for fails here, in one line, before a child starts."""
    given = config.tasks.tasks is not None
    tasks = config.tasks.tasks if given else default_tasks(config.data is None)
    kept = []
    for task in (t for t in tasks if f"acc_{t}" in metrics):
        if build_items(task, docs, config.tasks, strict=given)[0]:
            kept.append(task)
        elif given:
            raise DataError(
                f"task {task}: the evaluated text has no items for it (too few sentences or names); pass a longer text with --data, raise --eval-tokens, or drop --task {task}"
            )
    return replace(config.tasks, tasks=tuple(kept))


def _check_threads_and_cpus(config: BenchConfig) -> None:
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {config.threads}; give the number of torch threads, e.g. 2")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    bad = [c for c in config.cpus if c not in allowed]
    if bad:
        raise ConfigError(f"cpus {bad} are not cores this process may run on; choose among {allowed}")


def bench(
    model: str | os.PathLike | None = None,
    config: BenchConfig = BenchConfig(),
    *,
    store: Store | str | os.PathLike | None = None,
    progress: Progress | None = None,
    kind: str = "bench",
    record: dict | None = None,
    extra: list[Measurement] = (),
    key: str | None = None,
) -> BenchResult:
    """Measure `model` (None: the built-in default) in a fresh child process and store the run.

    `store` is an open Store, or the path of one (None: the default store), opened only once
    every input has been checked. `kind`, `record` (merged into the stored config) and `extra`
    figures let callers such as `frugalm run` store what produced the model with its scorecard;
    `key` identifies model + settings so that `frugalm optimize` can resume.
    """
    spec = prepare(model, config)
    # Damaged weights fail here in one line, before the store is opened or a child starts (not
    # in prepare: optimize first checks that the weights fit in memory, by their sizes).
    check_weights(ModelSource(spec.model_ref, Path(spec.model_path)))
    if spec.reference_path:
        check_weights(ModelSource(str(config.reference), Path(spec.reference_path)))
    recorded = {
        **asdict(config),
        "workloads": spec.workloads,
        "data": spec.data_desc,
        "profile": spec.profile,
        **(record or {}),
    }
    run = Run(
        kind=kind,
        key=key,
        model_ref=spec.model_ref,
        model_path=spec.model_path,
        benchmark_version=BENCHMARK_VERSION,
        config=recorded,
        environment={},
    )
    if not isinstance(store, Store):
        with Store(store) as own:
            return _measure_and_store(spec, config, run, own, progress, list(extra))
    return _measure_and_store(spec, config, run, store, progress, list(extra))


def _measure_and_store(
    spec: BenchSpec, config: BenchConfig, run: Run, store: Store, progress: Progress | None, extra: list[Measurement]
) -> BenchResult:
    keys = reference_score_keys(spec)
    spec.reference_scores = {t: s for t, k in keys.items() if (s := store.reference_scores(k)) is not None}
    t0 = time.perf_counter()
    try:
        payload = run_child(spec, timeout_s=config.timeout_s, progress=progress)
    except ChildCrash as exc:  # recorded as failed, so the store says what happened
        run.status, run.error, run.wall_s = "failed", str(exc), time.perf_counter() - t0
        store.add_run(run, [])
        raise
    run.wall_s = time.perf_counter() - t0
    run.environment = {**payload["environment"], "baseline_rss_bytes": payload["baseline_rss_bytes"]}
    measurements = [Measurement(**m) for m in payload["measurements"]] + extra
    store.add_run(run, measurements)
    for task, scores in payload["reference_scores"].items():
        if task in keys and task not in spec.reference_scores:
            store.add_reference_scores(keys[task], scores)
    return BenchResult(run, measurements)


def reference_score_keys(spec: BenchSpec) -> dict[str, str]:
    """{task: the key its reference item scores are stored under}: a hash of everything those
    scores depend on (the reference's files, the items, the task protocol, the measured model's
    context, device, dtype, attention kernel, threads asked for, library versions), so that a child scores
    the reference on a task only the first time (optimize's variants all share one reference)."""
    if not spec.reference_path or not spec.tasks.get("tasks"):
        return {}
    protocol = TaskProtocol(**{**spec.tasks, "tasks": tuple(spec.tasks["tasks"])})
    context = context_length(read_config(ModelSource(spec.model_ref, Path(spec.model_path))))
    settings = [
        folder_identity(Path(spec.reference_path)), asdict(protocol), context, spec.device, spec.dtype,
        spec.attn_implementation, spec.threads, spec.cpus, torch.__version__,
        transformers.__version__,
    ]  # fmt: skip
    keys = {}
    for task in protocol.tasks:
        part = [*settings, task, items_digest(build_items(task, spec.docs, protocol)[0])]
        keys[task] = hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()
    return keys
