"""The search as `frugalm optimize` runs it: its plan checked up front, its trials keyed into
optimize's store and output folder, screened against optimize's quality constraints, locally or
on Ray, and its summary (trials, front, hypervolume by trial, importances) stored with the session
for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from frugalm.benchmark.api import BenchConfig, bench
from frugalm.errors import ConfigError
from frugalm.measure.metrics import get_metric
from frugalm.models import METADATA_FILE, ModelSource, read_config
from frugalm.pareto import Constraint, non_dominated
from frugalm.ray_trials import check_address, cluster, submit
from frugalm.recipe import Recipe, parse_recipe, recipe_to_dict
from frugalm.search import (
    Objective,
    Outcome,
    Pending,
    SearchConfig,
    hypervolume_curve,
    importances,
    journal_path,
    reference_point,
    run_search,
    search_constraints,
    study_identity,
)
from frugalm.space import Layout, Space, load_space, space_to_dict
from frugalm.store import Run, Store
from frugalm.trials import Screen, TrialSpec, figures, key_of, land, measure_trial, screened

RATIO_METRICS = ("speedup_ttft", "speedup_decode", "energy_ratio_decode", "cost_ratio_decode")
"""Figures relative to the baseline: the baseline's own is 1 by definition."""


@dataclass(frozen=True)
class SearchPlan:
    config: SearchConfig
    space: Space
    layout: Layout
    objectives: tuple[Objective, ...]


@dataclass
class SearchOutput:
    entries: list[tuple[str, Run, dict]]
    """(name, run, recipe) of every complete trial variant, once each."""
    summary: dict


def plan_search(
    config: SearchConfig, source: ModelSource, headline: str, bench_config: BenchConfig
) -> SearchPlan | None:
    """Check the search's settings before anything runs; None when no search was asked for."""
    if not (config.trials or config.time_budget_s):
        return None
    problems = config.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    space = load_space(config.space)
    objectives = tuple(Objective.parse(o, headline) for o in config.objectives)
    for o in objectives:
        if bench_config.metrics is not None and o.metric not in bench_config.metrics:
            raise ConfigError(f"objective '{o}' is not among the measured metrics; add --metric {o.metric} or drop it")
        if o.metric in RATIO_METRICS and not bench_config.speedup:
            raise ConfigError(f"objective '{o}' needs paired timing; drop --no-speedup or the objective")
    if len({o.metric for o in objectives}) != len(objectives):
        raise ConfigError("objectives name one metric twice; give each metric once")
    if config.ray:
        check_address(config.ray)
    layout = Layout.of(read_config(source))
    for slot in space.slots:
        for group in slot.groups:  # an architecture the groups cannot resolve against: one line now
            layout.targets(group, slot.groups)
    return SearchPlan(config, space, layout, objectives)


def run_planned_search(plan, source, config, db: Store, settings, out: Path, state: dict, baseline, portfolio,
                       constraints: list[Constraint], progress, say) -> SearchOutput:  # fmt: skip
    sc = plan.config
    base_fig = figures(db.measurements(baseline.run.id))
    for o in plan.objectives:
        if str(o) not in base_fig:
            if o.metric not in RATIO_METRICS:
                raise ConfigError(
                    f"objective '{o}' was not measured for the baseline; check --metric and the workloads"
                )
            base_fig[str(o)] = 1.0
    bounds = [(c, c.bound(base_fig.get(c.metric))) for c in search_constraints(constraints)]
    base_outcome = Outcome("complete", "baseline", baseline.run.id, base_fig)
    worst = {str(o): v for o, v in zip(plan.objectives, reference_point(base_fig, plan.objectives).values())}
    screen_for = _screening(sc, source, config.bench, db, settings, constraints, progress, say)

    def evaluate(point: dict):
        try:
            recipe = plan.space.recipe(point, plan.layout)
        except ConfigError as exc:
            return Outcome("infeasible", reason=str(exc))
        if recipe is None:  # every slot left out: the base model itself
            return base_outcome
        rdict = recipe_to_dict(recipe)
        key, artifact = key_of(settings, rdict, str(out)), out / "variants" / recipe.name
        done = db.complete_run_with_key(key)
        if done and ((artifact / METADATA_FILE).is_file() or state["removed_dominated"].get(recipe.name) == key):
            return Outcome("complete", recipe.name, done.id, figures(db.measurements(done.id)))
        screen = screen_for(rdict)
        before = screened(db, screen) if screen else None
        if before and before[2]:  # screened out before: no need to build the variant again
            return Outcome("pruned", recipe.name, *before)
        state["removed_dominated"].pop(recipe.name, None)
        say(f"search: {recipe.name}: {' -> '.join(_stage_text(s) for s in rdict['stages'])}")
        spec = TrialSpec(recipe.name, rdict, str(source.path), config.bench, key, screen, config.force)
        if sc.ray:
            return Pending(submit(spec), lambda shipped: land(shipped, db, artifact))
        return measure_trial(spec, db, artifact, progress)

    warm = []
    for entry in portfolio:
        point = plan.space.point_of(_as_recipe(entry.recipe), plan.layout) if entry.run and entry.recipe else None
        if point is not None:
            warm.append((point, Outcome("complete", entry.name, entry.run.id, figures(db.measurements(entry.run.id)))))
    identity = study_identity(settings, space_to_dict(plan.space), [str(o) for o in plan.objectives],
                              [str(c) for c, _ in bounds], sc.sampler, sc.seed, sc.warm_start, str(out))  # fmt: skip
    if sc.ray:
        with cluster(sc.ray) as slots:
            say(f"search: on the Ray cluster '{sc.ray}', {slots} trial slot(s)")
            result = run_search(plan.space, plan.layout, sc, plan.objectives, bounds, evaluate,
                                journal=journal_path(out), identity=identity, warm=warm, concurrency=slots, worst=worst, say=say)  # fmt: skip
    else:
        result = run_search(plan.space, plan.layout, sc, plan.objectives, bounds, evaluate,
                            journal=journal_path(out), identity=identity, warm=warm, worst=worst, say=say)  # fmt: skip
    return SearchOutput(_entries(db, result.trials, portfolio), _summary(plan, result, base_fig, bounds))


def _screening(sc: SearchConfig, source, bench_config: BenchConfig, db: Store, settings, constraints, progress, say):
    """recipe dict -> its Screen (or None): the quality constraints checked on the first
    `screen_tokens` tokens, relative bounds taken from the baseline's own screen (measured once)."""
    quality = [c for c in search_constraints(constraints) if get_metric(c.metric).resource == "quality"]
    if not quality:
        return lambda rdict: None
    metrics = tuple(dict.fromkeys(c.metric for c in quality))
    screen_bench = replace(
        bench_config,
        metrics=metrics,
        protocol=replace(bench_config.protocol, max_tokens=sc.screen_tokens),
        speedup=False,
        reference=str(source.path),
    )
    base_key = key_of(settings, "baseline", "screen", sc.screen_tokens)
    base = db.complete_run_with_key(base_key)
    if base is None:
        say(f"search: screening the baseline ({', '.join(metrics)} on the first {sc.screen_tokens} tokens)")
        base = bench(source.path, screen_bench, store=db, progress=progress, kind="screen", key=base_key).run
    base_fig = figures(db.measurements(base.id))
    bounds = tuple((c, c.bound(base_fig.get(c.metric))) for c in quality)
    return lambda rdict: Screen(screen_bench, key_of(settings, rdict, "screen", sc.screen_tokens), bounds)


def _stage_text(stage: dict) -> str:
    shown = ("bits", "group_size", "sparsity", "pattern", "fraction", "steps")
    return stage["technique"] + "(" + ", ".join(f"{k}={stage[k]}" for k in shown if k in stage) + ")"


def _as_recipe(rdict: dict) -> Recipe:
    recipe, _ = parse_recipe(rdict)
    return recipe


def _entries(db: Store, trials: list[dict], portfolio) -> list[tuple[str, Run, dict]]:
    taken = {e.name for e in portfolio}
    out = []
    for t in trials:
        if t["source"] == "search" and t["state"] == "complete" and t["name"] not in taken and t["run_id"]:
            run = db.get_run(t["run_id"])
            taken.add(t["name"])
            out.append((t["name"], run, run.config.get("variant", {}).get("recipe")))
    return out


def _settings_text(plan: SearchPlan, params: dict) -> str:
    try:
        stages = plan.space.stages(params, plan.layout)
    except KeyError:  # a trial killed while the sampler was still drawing its values: a partial point
        return "cut off while its settings were drawn"
    return " -> ".join(_stage_text(st) for st in stages) or "base model"


def _summary(plan: SearchPlan, result, base_fig: dict, bounds) -> dict:
    objectives = plan.objectives
    reference = reference_point(base_fig, objectives)
    for t in result.trials:
        t["settings"] = _settings_text(plan, t["params"])
    complete = [
        t for t in result.trials if t["state"] == "complete" and all(str(o) in t["figures"] for o in objectives)
    ]
    points = [{o.metric: t["figures"][str(o)] for o in objectives} for t in complete]
    front = [complete[i]["name"] for i in non_dominated(points, [o.metric for o in objectives])] if points else []
    return {
        "space": plan.space.name,
        "sampler": type(result.study.sampler).__name__,
        "seed": plan.config.seed,
        "objectives": [str(o) for o in objectives],
        "constraints": [f"{c} (bound {b:.4g})" for c, b in bounds],
        "reference": {str(o): reference[o.metric] for o in objectives},
        "measured": result.new,
        "trials": result.trials,
        "front": list(dict.fromkeys(front)),
        "hypervolume": hypervolume_curve(result.trials, objectives, reference),
        "importances": importances(result.study, objectives),
    }
