"""One search trial, from recipe to stored figures: what runs in this process or on a Ray node.

    recipe ──build, save──▶ artifact ──screen (cheap perplexity, stored under its own key)──▶
        breaks a quality bound: pruned (artifact removed; the screen's figures stay stored)
        else ──full measurement (stored under the trial's key)──▶ complete

A `TrialSpec` is plain data (picklable), so the same `measure_trial` serves a local search and
a Ray task; on a node it writes into a scratch store and folder, and `ship`/`land` bring the
runs and the artifact back to the coordinator's store and output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from frugalm.atomic import OWNED_BY
from frugalm.benchmark.api import BenchConfig, bench
from frugalm.errors import FrugalmError, MeasurementError
from frugalm.measure.metrics import Measurement
from frugalm.pareto import Constraint
from frugalm.recipe import parse_recipe
from frugalm.run import RunConfig, run_recipe
from frugalm.search import Outcome
from frugalm.store import Run, Store

SCREEN_SLACK = 0.02
"""A screened trial is pruned only when its cheap figure breaks the bound by more than 2%: a
few thousand tokens estimate perplexity to about that, so a variant near the bound gets its full
measurement instead of being dropped on the screen's noise."""


@dataclass(frozen=True)
class Screen:
    bench: BenchConfig
    """The cheap measurement: the constrained quality metrics on the first screen tokens."""
    key: str
    bounds: tuple[tuple[Constraint, float], ...]
    """(constraint, its bound on the screen's scale: relative bounds taken from the baseline's screen)."""


@dataclass(frozen=True)
class TrialSpec:
    name: str
    recipe: dict
    model: str
    bench: BenchConfig
    key: str
    screen: Screen | None = None
    force: bool = False


def key_of(*parts) -> str:
    """A stored run's key: a hash of everything that determines its figures."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def figures(measurements: list[Measurement]) -> dict[str, float]:
    """Figures by 'metric' or 'metric@workload', as objectives name them."""
    return {f"{m.metric}@{m.workload}" if m.workload else m.metric: float(m.value) for m in measurements}


def screen_verdict(found: dict[str, float], bounds: tuple[tuple[Constraint, float], ...]) -> str | None:
    for c, bound in bounds:
        value = found.get(c.metric)
        slack = abs(bound) * SCREEN_SLACK
        if value is not None and not c.holds(value, bound + slack if c.op == "<=" else bound - slack):
            return f"screen: {c.metric} {value:.4g} on the first tokens breaks {c} (bound {bound:.4g}, {SCREEN_SLACK:.0%} slack)"
    return None


def screened(store: Store, screen: Screen) -> tuple[str, dict[str, float], str | None] | None:
    """(run id, figures, verdict) of this trial's stored screen, if it was screened before."""
    run = store.complete_run_with_key(screen.key)
    if run is None:
        return None
    found = figures(store.measurements(run.id))
    return run.id, found, screen_verdict(found, screen.bounds)


def measure_trial(spec: TrialSpec, store: Store, artifact: Path, progress=None) -> Outcome:
    """Build, screen and measure one trial into `store` and `artifact`; its Outcome. A screen stored
    before (a run killed between screen and measurement) is reused, never measured again."""
    t0 = time.perf_counter()
    recipe, problems = parse_recipe(spec.recipe)
    if problems:
        return Outcome("infeasible", spec.name, reason="; ".join(problems))
    screen_run: list = []

    def screen(path: Path) -> str | None:
        found = screened(store, spec.screen)
        if found is None:
            result = bench(path, spec.screen.bench, store=store, progress=progress, kind="screen", key=spec.screen.key)
            measured = figures(result.measurements)
            found = (result.run.id, measured, screen_verdict(measured, spec.screen.bounds))
        screen_run.append(found)
        return found[2]

    try:
        result = run_recipe(
            recipe,
            spec.model,
            RunConfig(out_dir=str(artifact), bench=spec.bench, force=spec.force),
            store=store,
            progress=progress,
            key=spec.key,
            screen=screen if spec.screen else None,
        )
    except MeasurementError as exc:  # the variant broke (NaN weights, a crashed child)
        return Outcome("failed", spec.name, reason=str(exc), cost_s=time.perf_counter() - t0)
    except FrugalmError as exc:  # the recipe does not fit this model
        return Outcome("infeasible", spec.name, reason=str(exc), cost_s=time.perf_counter() - t0)
    if result.screened_out:
        remove_artifact(result.artifact)
        run_id, found, _ = screen_run[0]
        return Outcome("pruned", spec.name, run_id, found, result.screened_out, time.perf_counter() - t0)
    return Outcome(
        "complete",
        spec.name,
        result.bench.run.id,
        figures(result.bench.measurements),
        cost_s=time.perf_counter() - t0,
    )


def remove_artifact(folder: Path) -> None:
    """Remove a variant folder frugalm wrote (never one it did not)."""
    if not folder.is_symlink() and folder.is_dir() and any((folder / mark).is_file() for mark in OWNED_BY):
        shutil.rmtree(folder)


# --- on a remote node -------------------------------------------------------------------------


@dataclass
class Shipped:
    """A trial measured elsewhere: its outcome, its stored runs, and its artifact's files."""

    outcome: Outcome
    runs: list[tuple[Run, list[Measurement]]]
    files: dict[str, bytes]


def measure_remote(spec: TrialSpec, threads: tuple[int, str | None]) -> Shipped:
    """`measure_trial` into a scratch store and folder, packed to travel back (a Ray task's body).

    `threads`: the coordinator's torch threads and OMP_NUM_THREADS. Ray pins its workers to one
    thread; float sums then add up in another order and figures differ in the 8th digit, so the
    task runs with the coordinator's settings, for the figures a local trial would store.
    """
    torch.set_num_threads(threads[0])
    os.environ.pop("OMP_NUM_THREADS", None)
    if threads[1] is not None:
        os.environ["OMP_NUM_THREADS"] = threads[1]
    with tempfile.TemporaryDirectory(prefix="frugalm-trial-") as scratch:
        root = Path(scratch)
        with Store(root / "trial.db") as db:
            outcome = measure_trial(spec, db, root / spec.name)
            runs = [(r, db.measurements(r.id)) for r in db.runs()]
        folder = root / spec.name
        files = (
            {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            if outcome.state == "complete"
            else {}
        )
    return Shipped(outcome, runs, files)


def land(shipped: Shipped, store: Store, artifact: Path) -> Outcome:
    """Write a shipped trial's artifact into `artifact` and its runs into `store` (the variant run
    pointing at the landed artifact); its outcome."""
    if shipped.files:
        partial = artifact.parent / f".{artifact.name}.landing"
        shutil.rmtree(partial, ignore_errors=True)
        for rel, data in shipped.files.items():
            target = (partial / rel).resolve()
            if not target.is_relative_to(partial.resolve()):  # a name that climbs out: never written
                raise MeasurementError(f"trial {shipped.outcome.name}: shipped file '{rel}' lies outside its artifact")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        remove_artifact(artifact)
        partial.rename(artifact)  # complete or absent, as save_variant leaves it
    for run, measurements in sorted(shipped.runs, key=lambda rm: rm[0].kind != "screen"):
        if store.complete_run_with_key(run.key) is None:
            if run.kind == "variant":
                run = replace(run, model_path=str(artifact))
            store.add_run(run, measurements)
    return shipped.outcome
