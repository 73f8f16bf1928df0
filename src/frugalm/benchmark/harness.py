"""lm-evaluation-harness tasks on a model as it runs: packed weights, their kernels, its KV cache.

`frugalm eval` runs any lm-eval task on a variant loaded by `load_model` (so scores are those of
the artifact a user ships, not of a dequantized copy; harness_lm.py says how it is scored),
fully offline: task YAMLs point at local data files (`dataset_path: json`, `dataset_kwargs:
{data_files: ...}`), or at datasets already in the local Hugging Face cache. Each lm-eval figure
is stored with lm-eval's own stderr as its spread; with a reference model, the per-document
scores of both are paired by doc_id and `stats.bootstrap_delta` gives the paired difference and
its interval (protocol["paired"]). lm-eval is an optional extra, imported where used.
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from frugalm.benchmark.child import environment
from frugalm.benchmark.harness_lm import HarnessLM
from frugalm.errors import ConfigError, DataError, did_you_mean
from frugalm.measure.metrics import BENCHMARK_VERSION, Measurement
from frugalm.measure.stats import bootstrap_delta
from frugalm.models import load_model, resolve_model
from frugalm.store import Run, Store

MISSING = "lm-eval is not installed; pip install -e '.[eval]'"
PPL_METRICS = {
    "word_perplexity": "lm_eval_word_ppl",
    "byte_perplexity": "lm_eval_byte_ppl",
    "bits_per_byte": "lm_eval_bits_per_byte",
    "perplexity": "lm_eval_ppl",
}
"""lm-eval's lower-is-better metrics frugalm stores, by name."""
FRACTION_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1"})
"""lm-eval's higher-is-better metrics in [0, 1], stored as lm_eval_acc."""


@dataclass(frozen=True)
class HarnessConfig:
    num_fewshot: int | None = None
    """Few-shot examples per prompt (None: each task's own default)."""
    device: str = "cpu"
    """Device the model runs on: cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """Dtype of the model's float weights: float32, bfloat16 or float16."""
    max_length: int | None = None
    """Tokens of context per forward (None: the model's context length)."""
    bootstrap_iters: int = 100_000
    """lm-eval's bootstrap draws for the stderr of metrics without a closed form."""


def import_lm_eval():
    """lm_eval, fully offline: the Hugging Face libraries read their offline switches on import,
    so they are set first, and set again on any already imported."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets.config  # deferred: optional extra (lm-eval's dependency)
        import huggingface_hub.constants  # deferred: read after the offline switch is set
        import lm_eval  # deferred: optional extra
        from lm_eval.api.model import LM  # deferred: optional extra
    except ImportError:
        raise ConfigError(MISSING) from None
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    LM.register(HarnessLM)
    return lm_eval


def task_manager(include_path: str | os.PathLike | None, tasks: list[str]):
    """lm-eval's task index, checked to hold every task named: the YAMLs under `include_path` alone
    when they hold them all (indexing lm-eval's thousands of built-in tasks takes seconds), else
    those and the built-in tasks."""
    from lm_eval.tasks import TaskManager  # deferred: optional extra

    check_include_path(include_path)
    if not tasks:
        raise ConfigError("no task given; name at least one lm-eval task with --task")
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    for name in tasks:
        if name not in manager.all_tasks:
            raise ConfigError(
                f"unknown lm-eval task '{name}'{did_you_mean(name, manager.all_tasks)} Give a built-in task's name, or the name in a task YAML under --include DIR"
            )
    return manager


def check_include_path(include_path: str | os.PathLike | None) -> None:
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(
            f"task folder '{include_path}' (--include) is not a folder; give the folder of your task YAMLs"
        )


def load_tasks(manager, tasks: list[str]) -> list:
    """Task objects, their data loaded (offline); a task whose data is not local fails in one line."""
    out = []
    for name in tasks:
        try:
            loaded = manager.load([name])
        except OSError as exc:  # datasets: ConnectionError (offline), FileNotFoundError, DatasetNotFoundError
            raise DataError(
                f"task '{name}': its data could not be loaded offline ({_first_line(exc)}); check its data_files, or give a built-in task local data files in a task YAML (dataset_path: json, dataset_kwargs: {{data_files: ...}}) under --include"
            ) from None
        except ValueError as exc:  # lm-eval's own checks of a task's config
            raise ConfigError(f"task '{name}': lm-eval could not build it ({_first_line(exc)}); fix its YAML") from None
        groups = loaded.get("groups") or {}
        out += [groups[name]] if name in groups else list(loaded["tasks"].values())
    for task in _leaves(out):
        for metric, higher in task.higher_is_better().items():
            frugalm_metric(task.task_name, metric, higher)
    return out


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _leaves(objs: list) -> list:
    return [t for o in objs for t in (o.get_all_tasks() if hasattr(o, "get_all_tasks") else [o])]


def frugalm_metric(task: str, name: str, higher_is_better: bool | None) -> str:
    """The frugalm metric an lm-eval metric is stored as, by its name and lm-eval's direction."""
    if name in PPL_METRICS and higher_is_better is False:
        return PPL_METRICS[name]
    if name in FRACTION_METRICS and higher_is_better is True:
        return "lm_eval_acc"
    raise ConfigError(
        f"task '{task}': lm-eval metric '{name}' (higher_is_better: {higher_is_better}) fits no frugalm metric; use {', '.join(sorted(FRACTION_METRICS))} (fractions, higher is better) or {', '.join(PPL_METRICS)} (lower is better) in its metric_list"
    )


def run_tasks(lm_eval, lm: HarnessLM, manager, tasks: list[str], limit, config: HarnessConfig) -> dict:
    """lm-eval's results for `tasks` on `lm`, per-document samples included."""
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=load_tasks(manager, tasks),
        task_manager=manager,
        num_fewshot=config.num_fewshot,
        limit=limit,
        log_samples=True,
        bootstrap_iters=config.bootstrap_iters,
    )


def evaluate(
    model: str | os.PathLike,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    reference: str | os.PathLike | None = None,
    config: HarnessConfig = HarnessConfig(),
) -> list[Measurement]:
    """lm-eval's figures for `tasks` on `model` as it runs; with `reference`, each paired with it.

    The Hugging Face libraries stay offline for the rest of the process (import_lm_eval)."""
    lm_eval = import_lm_eval()
    manager = task_manager(include_path, list(tasks))
    lm = HarnessLM(load_model(model, device=config.device, dtype=config.dtype), config.max_length)
    results = run_tasks(lm_eval, lm, manager, list(tasks), limit, config)
    scoring = lm.describe()
    ref_results = None
    if reference is not None:
        del lm  # one model in memory at a time
        ref = HarnessLM(load_model(reference, device=config.device, dtype=config.dtype), config.max_length)
        ref_results = run_tasks(lm_eval, ref, manager, list(tasks), limit, config)
    common = {"lm_eval": lm_eval.__version__, "limit": limit, **scoring}
    return to_measurements(results, ref_results, common)


def to_measurements(results: dict, ref_results: dict | None, common: dict) -> list[Measurement]:
    """One Measurement per (task, metric, filter) of lm-eval's results."""
    out = []
    for task, figures in results["results"].items():
        if task not in results["configs"]:
            continue  # a group's aggregate: its tasks are stored one by one
        for key, value in figures.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = figures.get(f"{metric}_stderr,{filt}")
            stderr = stderr if isinstance(stderr, (int, float)) else None
            higher = results["higher_is_better"][task].get(metric)
            name = frugalm_metric(task, metric, higher)
            if name == "lm_eval_acc" and not 0 <= value <= 1:
                raise ConfigError(f"task '{task}': lm-eval metric '{metric}' = {value} is not a fraction in [0, 1]")
            proto = {**_task_protocol(results, task), **common, "metric": metric, "filter": filt, "stderr": stderr}
            scores = _sample_scores(results, task, metric, filt)
            if ref_results is not None:
                proto.update(_paired(scores, _sample_scores(ref_results, task, metric, filt), ref_results, task, key))
            out.append(
                Measurement(
                    name,
                    float(value),
                    method="measured",
                    workload=f"{task}:{metric}" + ("" if filt == "none" else f",{filt}"),
                    n=results["n-samples"][task]["effective"],
                    spread=stderr,
                    protocol=proto,
                    samples=[scores[d] for d in sorted(scores)] if scores else None,
                )
            )
    return out


def _task_protocol(results: dict, task: str) -> dict:
    cfg = results["configs"][task]
    kwargs = cfg.get("dataset_kwargs") or {}
    return {
        "harness": "lm-evaluation-harness",
        "task": task,
        "task_version": results["versions"].get(task),
        "output_type": cfg.get("output_type"),
        "num_fewshot": results["n-shot"].get(task),
        "samples": results["n-samples"][task],
        "dataset": {k: cfg.get(k) for k in ("dataset_path", "dataset_name", "test_split", "validation_split")},
        "data_files": _data_files(kwargs.get("data_files")),
    }


def _data_files(spec) -> list[dict]:
    """Each local data file a task reads, with its sha256 (None: not a local file, e.g. a URL)."""
    if spec is None:
        return []
    if isinstance(spec, dict):
        return [f for v in spec.values() for f in _data_files(v)]
    if not isinstance(spec, str):
        return [f for v in spec for f in _data_files(v)]
    paths = sorted(glob.glob(os.path.expanduser(spec))) or [spec]
    return [{"path": p, "sha256": _sha256(p) if os.path.isfile(p) else None} for p in paths]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample_scores(results: dict, task: str, metric: str, filt: str) -> dict[int, float]:
    """doc_id -> the document's score, where lm-eval's per-document value is a number (not for
    corpus-level metrics such as the perplexities, whose per-document values are tuples)."""
    scores = {}
    for s in results.get("samples", {}).get(task, []):
        value = s.get(metric)
        if s.get("filter") == filt and isinstance(value, (int, float)):
            scores[s["doc_id"]] = float(value)
    return scores


def _paired(model: dict, ref: dict, ref_results: dict, task: str, key: str) -> dict:
    """The reference's figure, and (where lm-eval scores each document) the paired difference."""
    figures = ref_results["results"][task]
    stderr = figures.get(key.replace(",", "_stderr,", 1))
    out = {"reference": {"value": figures.get(key), "stderr": stderr if isinstance(stderr, (int, float)) else None}}
    if not model or model.keys() != ref.keys():
        return {**out, "paired_note": "no paired interval: lm-eval scores this metric per corpus, not per document"}
    docs = sorted(model)
    return {**out, "paired": bootstrap_delta([model[d] for d in docs], [ref[d] for d in docs])}


# --- stored runs -----------------------------------------------------------------------------


def evaluate_and_store(
    model: str | os.PathLike,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    reference: str | os.PathLike | None = None,
    config: HarnessConfig = HarnessConfig(),
    store: Store | str | os.PathLike | None = None,
) -> tuple[Run, list[Measurement]]:
    """`evaluate`, then one run of kind "lm_eval" with its figures, in one transaction. Inputs are
    checked before anything runs; nothing is stored unless every task ran."""
    source = resolve_model(model)
    ref_source = resolve_model(reference) if reference is not None else None
    check_include_path(include_path)

    def evaluate_into(target: Store) -> tuple[Run, list[Measurement]]:
        t0 = time.perf_counter()
        measurements = evaluate(source.path, tasks, include_path=include_path, limit=limit,
                                reference=ref_source.path if ref_source else None,
                                config=config)  # fmt: skip
        run = Run(
            kind="lm_eval",
            model_ref=source.ref,
            model_path=str(source.path),
            benchmark_version=BENCHMARK_VERSION,
            config={
                "tasks": list(tasks),
                "include": str(include_path) if include_path is not None else None,
                "limit": limit,
                "reference": str(ref_source.path) if ref_source else None,
                **asdict(config),
            },
            environment=environment(config.device),
            wall_s=time.perf_counter() - t0,
        )
        target.add_run(run, measurements)
        return run, measurements

    if isinstance(store, Store):
        return evaluate_into(store)
    with Store(store) as own:  # opened before the tasks run: a bad store path fails first
        return evaluate_into(own)
