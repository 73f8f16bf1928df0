"""`frugalm optimize`: the main job. A portfolio of recipes -> measured variants -> Pareto front -> report.

1. Check everything first: the model, every recipe, the output folder, the profile, the
   constraints, and whether the model fits the device's memory (predicted from its files).
2. Measure the baseline, then each recipe's variant (`frugalm run`), each stored under a key
   that hashes the model's files, the benchmark settings, the resolved recipe and (for
   variants) the output folder. A rerun skips every key the store already holds complete, so
   an interrupted optimize resumes, and a run with other settings never mixes with this one;
   a skipped variant whose artifact has gone missing (not removed by optimize as dominated) is
   rebuilt. A recipe that does not fit the model (say, a group size that does not divide its
   widths) is reported as skipped with the reason, and one that fails (a stage leaves NaN
   weights, the child crashes) as failed with its cause; optimize goes on with the rest.
   Each variant's child also times it against the baseline, interleaved, for speedups with 95%
   intervals (measure/paired.py), from which the report calls speed, energy and money.
3. Measure the baseline once more, last, timed against itself: the two baseline runs give the
   run-to-run noise of every other figure, within which the report calls differences ties (see
   report/build.py), and its speedup over itself checks the paired timing (its interval should
   contain 1).
4. Compute the Pareto fronts (quality against each resource) from the stored figures, write the
   report (HTML, Markdown, JSON), and keep the artifacts of the variants on some front.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil
import torch

from frugalm.atomic import check_output_folder, write_text_atomic
from frugalm.benchmark.api import BenchConfig, bench, prepare
from frugalm.benchmark.runner import Progress, warm_children
from frugalm.errors import ConfigError, suggest
from frugalm.measure.metrics import BENCHMARK_VERSION
from frugalm.measure.paired import PairedConfig
from frugalm.measure.quality import PerplexityProtocol
from frugalm.measure.tasks import TaskProtocol
from frugalm.models import METADATA_FILE, ModelSource, check_weights, folder_identity, resolve_model
from frugalm.pareto import Constraint
from frugalm.recipe import (
    SHIPPED_DIR,
    Recipe,
    load_recipe,
    name_problems,
    recipe_to_dict,
)
from frugalm.report.build import build_report_data, write_reports
from frugalm.report.utility import parse_rates
from frugalm.search import SearchConfig
from frugalm.search_run import plan_search, run_planned_search
from frugalm.store import Run, Store
from frugalm.trials import TrialSpec, key_of, measure_trial, remove_artifact

DEFAULT_CONSTRAINTS = ("ppl_tok<=+5%", "ppl_tok<=+20%")


@dataclass(frozen=True)
class OptimizeConfig:
    """The main job's settings; `frugalm optimize`'s options and their defaults are generated from
    these fields and BenchConfig's (cli/config_options.py)."""

    out_dir: str = "frugalm-optimize"
    """Output folder: report.html, .md and .json, and variants/."""
    recipes: tuple[str, ...] = ()
    """Recipe files or names of shipped recipes; empty: every shipped recipe."""
    bench: BenchConfig = field(
        default_factory=lambda: BenchConfig(
            repetitions=3,
            protocol=PerplexityProtocol(max_tokens=16_384),
            paired=PairedConfig(budget_s=4.0),
            tasks=TaskProtocol(items=200),
        )
    )
    """Fewer repetitions and evaluated tokens than `bench`: the job measures every recipe's variant
    and the baseline twice. The robustness text is PerplexityProtocol's default, as in `bench`, so
    both give the same robust_ppl_ratio of a model. Each variant is timed against the baseline in
    its measuring child (paired speedups, 95% intervals, target +-3%) on the headline (first)
    workload unless `--speedup-workload` names others, with at most 4 s per figure, so the main
    job stays within minutes; `--speedup-budget` buys tighter intervals. Tasks score 200 items each
    (bench: 400): each variant's child scores them for the variant and the baseline."""
    constraints: tuple[str, ...] = DEFAULT_CONSTRAINTS
    """Quality bounds for the recommendations, relative to the baseline ('ppl_tok<=+5%') or absolute ('peak_mem_mib<=200')."""
    keep_dominated: bool = False
    """Keep the artifacts of variants on no front (by default they are removed; their figures stay)."""
    force: bool = False
    """Write into an existing output folder that frugalm did not write (by default refused; its variants/ folders may be replaced)."""
    portfolio: bool = True
    """Run the recipes (the portfolio) before any search; False: the search alone, from a cold start."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The adaptive search after the portfolio (`--search N`; see frugalm/search.py)."""
    utility: tuple[str, ...] = ()
    """Exchange rates of the report's utility ranking, RESOURCE=POINTS (points of quality per halving of the resource; defaults in report/utility.py)."""


@dataclass
class Entry:
    name: str
    run: Run | None
    recipe: dict | None = None
    skipped: str | None = None


@dataclass
class OptimizeResult:
    out_dir: Path
    baseline: Entry
    variants: list[Entry]
    session: Run
    report_paths: dict[str, Path]


def shipped_recipe_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


SESSION_FILE = "frugalm-optimize.json"
"""Marks an output folder as optimize's and records which artifacts it removed as dominated."""


def _recipe_paths(names: tuple[str, ...]) -> list[Path]:
    if not names:
        return sorted(SHIPPED_DIR.glob("*.yaml"))
    paths = []
    for n in names:
        p = Path(n)
        if not p.is_file():
            p = SHIPPED_DIR / f"{n}.yaml"
        if not p.is_file():
            raise ConfigError(
                f"recipe '{n}' is neither a file nor a shipped recipe{suggest(n, shipped_recipe_names())}"
            )
        paths.append(p)
    return paths


def _load_recipes(paths: list[Path]) -> list[tuple[str, Recipe]]:
    """(name, recipe) per file; the name is the file's stem, which names its variant folder."""
    seen: dict[str, Path] = {}
    for p in paths:
        for problem in name_problems(p.stem, label=f"recipe file '{p}': its name"):
            raise ConfigError(problem)
        if p.stem in seen and seen[p.stem].resolve() != p.resolve():
            raise ConfigError(
                f"two recipes are named '{p.stem}' ('{seen[p.stem]}' and '{p}'); their variants would share a folder: rename one file"
            )
        seen[p.stem] = p
    return [(name, load_recipe(p)) for name, p in seen.items()]


def _check_out_dir(out_arg: str, force: bool) -> Path:
    out = check_output_folder(out_arg, force=force or _written_by_optimize(Path(out_arg).expanduser()), flag="--force")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(
            f"output folder '{out}' is not writable (no write permission on '{probe}'); pass a writable folder with --out"
        )
    return out


def _written_by_optimize(out: Path) -> bool:
    """Whether `out` is an optimize output folder: it holds SESSION_FILE, or (before it existed) a frugalm report."""
    if out.is_symlink() or not out.is_dir():
        return False
    if (out / SESSION_FILE).is_file():
        return True
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and str(report.get("benchmark_version", "")).startswith("frugalm-bench")


def _session_state(out: Path) -> dict:
    try:
        state = json.loads((out / SESSION_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    return (
        state
        if isinstance(state, dict) and isinstance(state.get("removed_dominated"), dict)
        else {"format": "frugalm-optimize/1", "removed_dominated": {}}
    )


def _check_fits_memory(source: ModelSource, device: str) -> None:
    """Refuse, before loading, a model whose weights alone exceed the device's free memory."""

    weights = sum(f.stat().st_size for f in source.path.glob("*.safetensors")) or sum(
        f.stat().st_size for f in source.path.glob("*.bin")
    )
    need = weights * 2.2  # the model, a reference copy for fidelity, and working memory
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        where = f"GPU {device}"
    else:
        free, where = psutil.virtual_memory().available, "this machine"
    if need > free:
        raise ConfigError(
            f"model '{source.ref}' has {weights / 2**30:.1f} GiB of weights and needs about {need / 2**30:.1f} GiB to optimize, but {where} has {free / 2**30:.1f} GiB free; use a machine with more memory or a smaller model"
        )


def optimize(
    model: str | os.PathLike | None = None,
    config: OptimizeConfig = OptimizeConfig(),
    *,
    store: Store | str | os.PathLike | None = None,
    progress: Progress | None = None,
    say=print,
) -> OptimizeResult:
    # 1. Everything that can be wrong is found before anything runs.
    source = resolve_model(model)
    recipes = _load_recipes(_recipe_paths(config.recipes)) if config.portfolio else []
    constraints = [Constraint.parse(c) for c in config.constraints]
    parse_rates(config.utility)  # a bad rate fails now, not after the measurements
    out = _check_out_dir(config.out_dir, config.force)
    spec = prepare(source.path, config.bench)  # model, data, workloads, metrics, profile, device
    if not config.bench.speedup_workloads:  # the report judges speed on the headline (first) workload
        config = replace(config, bench=replace(config.bench, speedup_workloads=(spec.workloads[0]["name"],)))
    plan = plan_search(config.search, source, spec.workloads[0]["name"], config.bench)
    _check_fits_memory(source, config.bench.device)
    check_weights(source)  # a damaged weights file is one line now, not a failed baseline later
    settings = [
        BENCHMARK_VERSION,
        folder_identity(source.path),
        spec.data_desc,
        spec.workloads,
        spec.profile,
        config.bench.device,
        config.bench.dtype,
        asdict(config.bench.protocol),
        config.bench.warmup,
        config.bench.repetitions,
        config.bench.metrics,
        config.bench.speedup,
        config.bench.speedup_workloads,
        asdict(config.bench.paired),
        config.bench.threads,
        config.bench.cpus,
        # only when set, so that the keys of sessions run before the setting existed still resume
        *([{"attn_implementation": config.bench.attn_implementation}] if config.bench.attn_implementation else []),
    ]
    out.mkdir(parents=True, exist_ok=True)
    state = _session_state(out)
    write_text_atomic(
        out / SESSION_FILE, json.dumps(state, indent=2)
    )  # marks the folder as optimize's before anything else lands in it
    with contextlib.nullcontext(store) if isinstance(store, Store) else Store(store) as db, warm_children():
        baseline = _baseline(source, config, db, key_of(settings, "baseline"), progress, say)
        variants = [
            _variant(
                name,
                recipe,
                source,
                config,
                db,
                key_of(settings, recipe_to_dict(recipe), str(out)),
                out,
                state,
                progress,
                say,
            )
            for name, recipe in recipes
        ]
        searched = None
        if plan:
            searched = run_planned_search(
                plan, source, config, db, settings, out, state, baseline, variants, constraints, progress, say
            )
            variants += [Entry(name, run, recipe) for name, run, recipe in searched.entries]
        control = _baseline(
            source,
            config,
            db,
            key_of(settings, "baseline", "control"),
            progress,
            say,
            label="baseline again, and timed against itself (run-to-run noise; a check of the paired timing)",
            reference=source.path,
        )

        session = Run(
            kind="optimize",
            model_ref=source.ref,
            model_path=str(source.path),
            benchmark_version=BENCHMARK_VERSION,
            config={
                "baseline": baseline.run.id,
                "control": control.run.id,
                "variants": {v.name: (v.run.id if v.run else None) for v in variants},
                "skipped": {v.name: v.skipped for v in variants if v.skipped},
                "constraints": [str(c) for c in constraints],
                "constraint_specs": list(config.constraints),
                "utility": list(config.utility),
                "out_dir": str(out),
                **({"search": searched.summary} if searched else {}),
            },
            environment=baseline.run.environment,
        )
        data = build_report_data(db, session)
        db.add_run(session, [])
    paths = write_reports(data, out)
    if not config.keep_dominated:
        _remove_dominated_artifacts(out, data, variants, state)
    return OptimizeResult(out, baseline, variants, session, paths)


def _baseline(source, config, db: Store, key: str, progress, say, label: str = "baseline", reference=None) -> Entry:
    done = db.complete_run_with_key(key)
    if done:
        say(f"{label}: already measured (run {done.id}), skipped")
        return Entry("baseline", done)
    say(f"{label}: measuring")
    bench_config = replace(config.bench, reference=str(reference)) if reference else config.bench
    result = bench(source.path, bench_config, store=db, progress=progress, kind="baseline", key=key)
    return Entry("baseline", result.run)


def _variant(
    name: str, recipe: Recipe, source, config, db: Store, key: str, out: Path, state: dict, progress, say
) -> Entry:
    done = db.complete_run_with_key(key)
    artifact = out / "variants" / name
    if done and ((artifact / METADATA_FILE).is_file() or state["removed_dominated"].get(name) == key):
        say(f"{name}: already measured (run {done.id}), skipped")
        return Entry(name, done, recipe_to_dict(recipe))
    if done:
        say(f"{name}: measured before (run {done.id}) but its artifact {artifact} is missing: rebuilding it")
    say(f"{name}: {' -> '.join(s.technique for s in recipe.stages)}")
    rdict = recipe_to_dict(recipe)
    spec = TrialSpec(name, rdict, str(source.path), config.bench, key, force=config.force)
    outcome = measure_trial(spec, db, artifact, progress)
    if outcome.state == "failed":  # the variant broke (NaN weights, a crashed child): say why, go on with the rest
        say(f"{name}: failed: {outcome.reason}")
        return Entry(name, None, rdict, skipped=f"failed: {outcome.reason}")
    if outcome.state == "infeasible":  # the recipe does not fit this model: say why, go on with the rest
        say(f"{name}: skipped: {outcome.reason}")
        return Entry(name, None, rdict, skipped=outcome.reason)
    state["removed_dominated"].pop(name, None)
    return Entry(name, db.get_run(outcome.run_id), rdict)


def _remove_dominated_artifacts(out: Path, data, variants: list[Entry], state: dict) -> None:
    """Remove the artifacts of this session's variants on no front (only folders frugalm wrote), and note them."""
    keep = {v["name"] for v in data["variants"] if v.get("on_front")}
    for entry in variants:
        folder = out / "variants" / entry.name
        if entry.run is None or entry.name in keep:
            continue
        state["removed_dominated"][entry.name] = entry.run.key
        remove_artifact(folder)
    write_text_atomic(out / SESSION_FILE, json.dumps(state, indent=2))
