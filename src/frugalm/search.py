"""Adaptive multi-objective search over a recipe space (`frugalm optimize --search N`).

The search lives in `optimize` rather than in a command of its own: it needs the same baseline,
the same store keys, output folder and report, and the portfolio's figures are its warm start,
so one command gives one front over everything measured.

    portfolio (measured) ──warm start──▶ Optuna study (journal file in the output folder)
    ask ──▶ point of the space ──▶ recipe ──▶ evaluate (screen, build, measure, store) ──▶ tell

Sampler (`auto`): TPE (multi-objective, multivariate and grouped so the conditional structure
of optional slots is modelled, constraints as each trial's `set_constraint` values) for budgets of
up to 100 trials, where it learns from the first few; NSGA-II past that, where its populations
have the trials to evolve. Optuna's GP sampler was left out: its kernels model the categorical
and conditional parameters a recipe space is made of worse than TPE, per ask it costs seconds
where a trial here may cost seconds, and its edge (small continuous spaces) is rare in recipes.

Objectives are any stored metrics (`metric` or `metric@workload`; per-workload metrics default
to the headline workload), directions from the metric registry. Constraints are optimize's
`--constraint` bounds, the loosest per metric and direction (each recommendation then picks
within its own bound), given to Optuna as `(value - bound) / |bound|` (<= 0 feasible).

Staged evaluation, ties, keys and resuming are the caller's `evaluate` and this loop's:
every trial is a stored run under its key (a repeated configuration costs nothing, and is not
counted as one of the N); a point the sampler proposed before is answered from the study
without counting; a trial left running by a killed process is marked failed and its point
enqueued again, so a rerun finishes the same study with no stored trial redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from frugalm.errors import ConfigError
from frugalm.measure.metrics import get_metric
from frugalm.pareto import Constraint, hypervolume
from frugalm.space import Domain, Layout, Space

JOURNAL_FILE = "search.journal"
"""The study's Optuna journal, in the output folder (append-only; safe to kill at any point)."""
REFERENCE_SLACK = 0.5
"""Hypervolume reference point: the baseline's figure made 50% worse per objective (x1.5 for
lower-is-better, /1.5 for higher), so a variant counts once it beats that on every objective."""
MAX_REPEATS = 200
"""Consecutive proposals of already-tried points after which the space counts as exhausted."""


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 0
    """Variants the search proposes and measures after the portfolio (0: no search, or as many as --search-time allows). Repeated configurations are answered from the store and not counted."""
    space: str = "default"
    """Search space: a YAML file or the name of a shipped space."""
    objectives: tuple[str, ...] = ("ppl_tok", "weights_mib", "speedup_decode")
    """Stored metrics to optimize ('metric' or 'metric@workload'), directions from the metric registry."""
    time_budget_s: float | None = None
    """Stop proposing once the search has run this long (seconds, over resumed runs too)."""
    sampler: Literal["auto", "tpe", "nsga2", "random", "grid"] = "auto"
    """auto: TPE up to 100 trials, NSGA-II beyond; random: the baseline a search must beat; grid: every point of a finite space, once (Optuna's brute force)."""
    seed: int = 0
    """Sampler seed; part of the study's identity."""
    warm_start: bool = True
    """Give the portfolio's measured variants that are points of the space to the sampler first."""
    screen_tokens: int = 2048
    """Tokens of the cheap perplexity check a trial passes before its full measurement (with quality constraints)."""
    ray: str | None = None
    """Run trials as Ray tasks: 'local' (a local cluster) or an existing cluster's address (pip install frugalm[ray])."""

    def problems(self) -> list[str]:
        problems = []
        if self.trials < 0:
            problems.append(f"--search must be >= 0 (trials after the portfolio), got {self.trials}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            problems.append(f"--search-time must be > 0 seconds, got {self.time_budget_s}")
        if not self.objectives:
            problems.append("the search needs at least one --objective (a stored metric, e.g. ppl_tok)")
        if self.screen_tokens < 64:
            problems.append(f"--screen-tokens must be >= 64, got {self.screen_tokens}")
        return problems


@dataclass(frozen=True)
class Objective:
    metric: str
    workload: str | None = None

    @classmethod
    def parse(cls, text: str, headline: str) -> Objective:
        name, _, workload = text.partition("@")
        metric = get_metric(name.strip())  # an unknown metric: one line naming the valid ones
        if metric.per_workload:
            return cls(metric.name, workload.strip() or headline)
        if workload:
            raise ConfigError(f"objective '{text}': {metric.name} is not measured per workload; drop '@{workload}'")
        return cls(metric.name)

    def __str__(self) -> str:
        return f"{self.metric}@{self.workload}" if self.workload else self.metric


@dataclass
class Outcome:
    """What evaluating one point gave: `state` complete (figures), pruned (the screen broke a quality
    bound), infeasible (the recipe does not fit the model) or failed (the variant broke)."""

    state: Literal["complete", "pruned", "infeasible", "failed"]
    name: str = ""
    run_id: str | None = None
    figures: dict[str, float] = field(default_factory=dict)
    """Stored figures by 'metric' / 'metric@workload'."""
    reason: str = ""
    cost_s: float = 0.0
    """Wall time spent on it now (0 when answered from the store)."""


def search_constraints(constraints: Sequence[Constraint]) -> list[Constraint]:
    """The loosest bound per metric and direction (relative and absolute kept apart)."""
    loosest: dict[tuple, Constraint] = {}
    for c in constraints:
        k = (c.metric, c.op, c.relative)
        if k not in loosest or (c.value > loosest[k].value) == (c.op == "<="):
            loosest[k] = c
    return list(loosest.values())


def violations(figures: dict[str, float], constraints: Sequence[tuple[Constraint, float]]) -> dict[str, float]:
    """Optuna's constraint values by name: (value - bound) / |bound| for <=, (bound - value) / |bound| for >=
    (<= 0: met); a missing figure counts as broken."""
    out = {}
    for c, bound in constraints:
        v, scale = figures.get(c.metric), abs(bound) or 1.0
        out[f"{c.metric}{c.op}{bound:g}"] = (
            1.0 if v is None else (v - bound) / scale if c.op == "<=" else (bound - v) / scale
        )
    return out


def reference_point(baseline: dict[str, float], objectives: Sequence[Objective]) -> dict[str, float]:
    ref = {}
    for o in objectives:
        b = baseline[str(o)]
        ref[o.metric] = (
            b / (1 + REFERENCE_SLACK) if get_metric(o.metric).higher_is_better else b * (1 + REFERENCE_SLACK)
        )
    return ref


def hypervolume_of(
    figures: Sequence[dict[str, float]], objectives: Sequence[Objective], reference: dict[str, float]
) -> float:
    points = [{o.metric: f[str(o)] for o in objectives} for f in figures if all(str(o) in f for o in objectives)]
    return hypervolume(points, [o.metric for o in objectives], reference)


def _distribution(d: Domain):
    if d.choices:
        return CategoricalDistribution(d.choices)
    if d.integer:
        return IntDistribution(int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return FloatDistribution(d.low, d.high, step=d.step, log=d.log)


def _suggest(trial: optuna.Trial, name: str, d: Domain):
    if d.choices:
        return trial.suggest_categorical(name, d.choices)
    if d.integer:
        return trial.suggest_int(name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)


def _sampler(config: SearchConfig):
    """Constraints reach every sampler as each trial's `set_constraint` values (Optuna 5's mechanism)."""
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    if config.sampler == "grid":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _Exhaustive(seed=config.seed)
    if config.sampler == "nsga2" or (config.sampler == "auto" and config.trials > 100):
        return optuna.samplers.NSGAIISampler(seed=config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=config.seed,
            multivariate=True,
            group=True,
            # TPE models the trials it has; with tens of trials, a few random ones suffice to start
            n_startup_trials=max(3, min(10, config.trials // 4)),
        )


class _Exhaustive(optuna.samplers.BruteForceSampler):
    """Optuna's brute force, which stops the study once every point is tried; with ask and tell there
    is no optimize() to stop (Study.stop raises), so it raises `exhausted` for the loop to see."""

    exhausted = False

    def after_trial(self, study, trial, state, values) -> None:
        try:
            super().after_trial(study, trial, state, values)
        except RuntimeError:  # Study.stop outside optimize(): every point has been tried
            self.exhausted = True


def study_identity(*parts) -> str:
    return "frugalm-search-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class SearchResult:
    study: optuna.Study
    trials: list[dict]
    """Per trial in order: number, source (portfolio / search), name, run_id, state, params, figures, reason."""
    new: int
    """Variants this search measured (counted toward N), over all resumed runs."""


@dataclass
class Pending:
    """An evaluation running elsewhere (a Ray task): `finish(result)` lands it here, in this thread."""

    future: Future
    finish: Callable[[object], Outcome]


def run_search(
    space: Space,
    layout: Layout,
    config: SearchConfig,
    objectives: Sequence[Objective],
    constraints: Sequence[tuple[Constraint, float]],
    evaluate: Callable[[dict], Outcome | Pending],
    *,
    journal: Path,
    identity: str,
    warm: Sequence[tuple[dict, Outcome]] = (),
    concurrency: int = 1,
    worst: dict[str, float] | None = None,
    say=print,
) -> SearchResult:
    """Run (or resume) the study `identity` in `journal` until `config.trials` new variants are
    measured, the time budget is spent or the space is exhausted. `warm`: (point, outcome) of the
    portfolio's variants that are points of the space. `evaluate(point)` gives an Outcome, or a
    Pending one when it runs elsewhere; up to `concurrency` run at once. `worst`: objective values
    (by name) a pruned trial is told with (the hypervolume reference)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    directions = ["maximize" if get_metric(o.metric).higher_is_better else "minimize" for o in objectives]
    study = optuna.create_study(
        study_name=identity,
        storage=storage,
        directions=directions,
        sampler=_sampler(config),
        load_if_exists=True,
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left running by a killed process
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        say(f"search: trial {t.number} was cut off; retrying its point")
    if config.warm_start and not any(
        t.user_attrs.get("source") == "portfolio" for t in study.get_trials(deepcopy=False)
    ):
        for point, outcome in warm:
            if outcome.state == "complete" and _values(outcome, objectives) is not None:
                study.add_trial(_frozen(space, point, outcome, objectives, constraints, "portfolio"))
    started = time.monotonic()
    elapsed0 = float(study.user_attrs.get("elapsed_s", 0.0))
    repeats, running = 0, {}

    def counted() -> int:
        return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("counted"))

    def out_of_budget() -> bool:
        spent = elapsed0 + time.monotonic() - started
        by_count = (
            config.trials > 0 and counted() + len(running) >= config.trials
        )  # 0 with a time budget: no count limit
        return by_count or (config.time_budget_s is not None and spent >= config.time_budget_s)

    def finish(trial, outcome: Outcome) -> None:
        _tell(study, trial, outcome, objectives, constraints, worst, counted=outcome.state != "infeasible")
        study.set_user_attr("elapsed_s", elapsed0 + time.monotonic() - started)
        say(f"search: trial {trial.number} {outcome.name or '(base model)'}: {_describe(outcome, objectives)}")

    while running or not out_of_budget():
        if len(running) < concurrency and not out_of_budget() and repeats < MAX_REPEATS:
            trial = study.ask()
            point = space.sample(lambda name, d: _suggest(trial, name, d))
            known = _known(study, point, trial.number)
            if known is not None:  # proposed before: the same figures, no cost, not counted
                repeats += 1
                _tell(study, trial, known, objectives, constraints, worst, counted=False, repeat=True)
                continue
            repeats = 0
            trial.set_user_attr("source", "search")
            result = evaluate(point)  # an unexpected error stops the search; the trial stays RUNNING and is retried
            if isinstance(result, Pending):
                running[result.future] = (trial, result.finish)
            else:
                finish(trial, result)
            continue
        if not running:
            break
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in done:
            trial, land = running.pop(future)
            finish(trial, land(future.result()))
    if repeats >= MAX_REPEATS:
        say(f"search: the sampler proposed only tried points {MAX_REPEATS} times in a row: the space is exhausted")
    trials = [_trial_record(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    return SearchResult(study, trials, counted())


def _known(study: optuna.Study, point: dict, number: int) -> Outcome | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if t.number != number and t.params == point and "outcome" in t.user_attrs:
            return Outcome(**t.user_attrs["outcome"])
    return None


def _values(outcome: Outcome, objectives: Sequence[Objective]) -> list[float] | None:
    values = [outcome.figures.get(str(o)) for o in objectives]
    return None if any(v is None or not math.isfinite(v) for v in values) else values


def _tell(
    study, trial, outcome: Outcome, objectives, constraints, worst, *, counted: bool, repeat: bool = False
) -> None:
    """Tell the sampler. A pruned trial is told as a complete but infeasible one (its constraint
    values from the screen, its objectives at `worst`, which constrained samplers never rank it
    by), so the sampler learns to avoid its region; the trial's record still says pruned, and no
    front, hypervolume or importance counts it."""
    trial.set_user_attr("outcome", dataclasses.asdict(outcome))
    trial.set_user_attr("counted", counted and not repeat)
    if repeat:
        trial.set_user_attr("repeat", True)
    values = _values(outcome, objectives) if outcome.state == "complete" else None
    if outcome.state == "pruned" and worst and constraints:
        values = [worst[str(o)] for o in objectives]
    if values is None:
        state = TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL
        study.tell(trial, state=state)
        return
    for name, value in violations(outcome.figures, constraints).items():
        trial.set_constraint(name, value)
    study.tell(trial, values)


def _frozen(space, point, outcome, objectives, constraints, source: str):
    distributions = {k: _distribution(d) for k, d in space.domains(point).items()}
    return optuna.trial.create_trial(
        params=point,
        distributions=distributions,
        values=_values(outcome, objectives),
        user_attrs={
            "source": source,
            "outcome": dataclasses.asdict(outcome),
            "counted": False,
        },
        system_attrs={f"constraints:{k}": v for k, v in violations(outcome.figures, constraints).items()},
    )


def _describe(outcome: Outcome, objectives) -> str:
    if outcome.state != "complete":
        return f"{outcome.state}: {outcome.reason}"
    return ", ".join(f"{o} {outcome.figures[str(o)]:.4g}" for o in objectives if str(o) in outcome.figures)


def _trial_record(t: optuna.trial.FrozenTrial) -> dict:
    outcome = t.user_attrs.get("outcome", {})
    return {
        "number": t.number,
        "source": t.user_attrs.get("source", "search"),
        "name": outcome.get("name", ""),
        "run_id": outcome.get("run_id"),
        "state": outcome.get("state", t.state.name.lower()),
        "counted": bool(t.user_attrs.get("counted")),
        "repeat": bool(t.user_attrs.get("repeat")),
        "params": t.params,
        "figures": outcome.get("figures", {}),
        "reason": outcome.get("reason", ""),
    }


def importances(study: optuna.Study, objectives: Sequence[Objective]) -> dict[str, dict[str, float]]:
    """Per objective, each parameter's share of the variance that matters (Optuna's PED-ANOVA, which
    needs no scikit-learn), from the complete trials; empty where there are too few of them."""
    out = {}
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("outcome", {}).get("state") == "complete"  # not the pruned ones told as infeasible
    ]
    if len(complete) < 4:
        return out
    measured = optuna.create_study(directions=study.directions)
    measured.add_trials(complete)
    study = measured
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    for i, o in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = optuna.importance.get_param_importances(
                    study, evaluator=evaluator, target=lambda t, i=i: t.values[i]
                )
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few distinct trials to rank settings
            continue
        out[str(o)] = {k: float(v) for k, v in found.items()}
    return out


def hypervolume_curve(
    trials: Sequence[dict], objectives: Sequence[Objective], reference: dict[str, float]
) -> list[dict]:
    """Hypervolume of every complete trial up to each trial number (the portfolio's first)."""
    seen, curve = [], []
    for t in trials:
        if t["state"] == "complete":
            seen.append(t["figures"])
        curve.append(
            {"trial": t["number"], "source": t["source"], "hypervolume": hypervolume_of(seen, objectives, reference)}
        )
    return curve


def journal_path(out: Path) -> Path:
    return Path(out) / JOURNAL_FILE
