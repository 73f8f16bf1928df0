"""The search against an exhaustive grid and random search, and against the portfolio it starts from.

    .venv/bin/python benchmarks/bench_search.py grid [--out DIR] [--trials 12] [--seeds 0 1 2]
    .venv/bin/python benchmarks/bench_search.py portfolio [--out DIR] [--budget S] [--seeds N]

`grid`: stories260K on the first 16,384 TinyStories tokens (optimize's protocol), objectives
ppl_tok and weights_mib (both deterministic: perplexity measured, weights counted), no
constraints. The 36-point grid bits {4, 8} x group {32, 128, per channel} x method {RTN, GPTQ} x
Wanda sparsity {0, 0.3, 0.5} is measured exhaustively once (Optuna's brute-force sampler through
`optimize --search 36 --sampler grid`); then, for each seed, the search from a cold start (no
portfolio, TPE as `auto` picks it) and random search get `--trials` evaluations each. Every trial
is a stored run under its key, so the searches reuse the grid's measurements: each figure is
measured once, and every sampler sees the same figures. Hypervolume reference: the baseline's
figures made 50% worse (search.REFERENCE_SLACK). Printed: the grid's hypervolume, each seed's
search and random hypervolume as a fraction of it, and the medians over seeds.

`portfolio`: the shipped portfolio on stories260K with optimize's default settings (paired speed
timing included), its wall time T measured; then the default space, warm-started by the
portfolio, searched for T seconds (`--search-time T`) with the default objectives (ppl_tok,
weights_mib, speedup_decode). Printed: the portfolio's hypervolume and the search's (portfolio
and search trials together), same reference, and their ratio.

Run alone: the portfolio mode times speed, and 2 shared cores swing with any other load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import STORIES, TINYSTORIES  # noqa: E402

GRID = """version: 1
name: acceptance-grid
stages:
  - technique: wanda_prune
    optional: true
    sparsity: [0.3, 0.5]
  - technique: [rtn_quant, gptq_quant]
    bits: [4, 8]
    group_size: [32, 128, -1]
"""


def _optimize(out: Path, store: Path, search, **config):
    from frugalm.benchmark.api import BenchConfig
    from frugalm.optimize import OptimizeConfig, optimize

    base = OptimizeConfig()
    bench = replace(base.bench, data=str(TINYSTORIES), **config.pop("bench", {}))
    cfg = replace(base, out_dir=str(out), bench=bench, search=search, **config)
    assert isinstance(cfg.bench, BenchConfig)
    return optimize(STORIES, cfg, store=store, say=lambda line: print(line, file=sys.stderr, flush=True))


def _search_summary(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["search"]


def _objectives(summary: dict):
    from frugalm.search import Objective

    return [Objective(*o.split("@")) if "@" in o else Objective(o) for o in summary["objectives"]]


def _hv(trials: list[dict], summary: dict, reference: dict | None = None) -> float:
    """Hypervolume of the complete trials; reference: the search's own (baseline made 50% worse) unless given."""
    from frugalm.search import hypervolume_of

    objectives = _objectives(summary)
    reference = reference or {o.metric: summary["reference"][str(o)] for o in objectives}
    return hypervolume_of([t["figures"] for t in trials if t["state"] == "complete"], objectives, reference)


def _nadir_reference(trials: list[dict], summary: dict) -> dict:
    """The grid front's worst figure per objective, made 10% worse (lower-is-better objectives): a
    reference that weighs only the front's region, where samplers differ."""
    from frugalm.pareto import non_dominated

    metrics = [o.metric for o in _objectives(summary)]
    points = [{m: t["figures"][m] for m in metrics} for t in trials if t["state"] == "complete"]
    front = [points[i] for i in non_dominated(points, metrics)]
    return {m: max(p[m] for p in front) * 1.1 for m in metrics}


def grid(args) -> None:
    from frugalm.search import SearchConfig

    out, store = args.out / "grid", args.out / "grid.db"
    space = args.out / "grid.yaml"
    space.write_text(GRID)
    common = dict(
        portfolio=False,
        constraints=(),
        bench={"metrics": ("ppl_tok", "weights_mib"), "speedup": False},
    )
    objectives = ("ppl_tok", "weights_mib")
    t0 = time.perf_counter()
    _optimize(out, store, SearchConfig(trials=36, space=str(space), objectives=objectives, sampler="grid"), **common)
    summary = _search_summary(out)
    every = [t for t in summary["trials"] if t["counted"]]
    print(f"grid: {len(every)} configurations measured in {time.perf_counter() - t0:.0f} s")
    tight = _nadir_reference(every, summary)
    whole, whole_tight = _hv(every, summary), _hv(every, summary, tight)
    print(f"grid hypervolume (all {len(every)}): {whole:.6g} against the search's reference {summary['reference']}")
    print(f"                            {whole_tight:.6g} against the grid front's nadir + 10%: {tight}")
    rows = []
    for seed in args.seeds:
        found = {}
        for sampler in ("auto", "random"):
            cfg = SearchConfig(trials=args.trials, space=str(space), objectives=objectives, sampler=sampler, seed=seed)
            _optimize(out, store, cfg, **common)
            s = _search_summary(out)
            mine = [t for t in s["trials"] if t["counted"]]
            found[sampler] = (_hv(mine, s) / whole, _hv(mine, s, tight) / whole_tight, len(mine), s["sampler"])
        rows.append(found)
        a, r = found["auto"], found["random"]
        print(
            f"seed {seed}: search ({a[3]}, {a[2]} evaluations) {a[0]:.4f} of the grid's hypervolume, {a[1]:.4f} near the front; "
            f"random ({r[2]}) {r[0]:.4f}, {r[1]:.4f}"
        )
    for i, label in ((0, "the search's reference"), (1, "the front's nadir + 10%")):
        med_search = statistics.median(row["auto"][i] for row in rows)
        med_random = statistics.median(row["random"][i] for row in rows)
        wins = sum(row["auto"][i] > row["random"][i] for row in rows)
        print(
            f"{label}: median over seeds {list(args.seeds)}: search {med_search:.4f}, random {med_random:.4f} "
            f"of the grid's hypervolume; search ahead in {wins} of {len(rows)} seeds"
        )


def portfolio(args) -> None:
    from frugalm.search import SearchConfig

    out, store = args.out / "portfolio", args.out / "portfolio.db"
    t0 = time.perf_counter()
    _optimize(out, store, SearchConfig())
    wall = time.perf_counter() - t0
    print(f"portfolio: optimize took {wall:.0f} s (wall){' (answered from the store)' if args.budget else ''}")
    budget = args.budget or wall
    print(f"search budget: {budget:.0f} s, seed {args.seeds[0]}")
    t1 = time.perf_counter()
    _optimize(out, store, SearchConfig(trials=10_000, time_budget_s=budget, seed=args.seeds[0]))
    print(f"search: {time.perf_counter() - t1:.0f} s (wall, including the portfolio's answered-from-store pass)")
    s = _search_summary(out)
    warm = [t for t in s["trials"] if t["source"] == "portfolio"]
    print(f"objectives {s['objectives']}, reference {s['reference']}")
    print(f"portfolio points in the space: {len(warm)}; search trials measured: {s['measured']}")
    base, both = _report_hv(out, s, with_search=False), _report_hv(out, s, with_search=True)
    print(f"hypervolume: portfolio {base:.6g}, portfolio + search {both:.6g}, ratio {both / base:.3f}")


def _report_hv(out: Path, s: dict, with_search: bool) -> float:
    """Hypervolume of the report's variants (baseline and every portfolio recipe, in the space or not;
    the search's too when `with_search`), in the search's objectives and reference."""
    report = json.loads((out / "report.json").read_text())
    searched = {t["name"] for t in s["trials"] if t["source"] == "search"} - {"baseline"}  # the all-off point
    points = [
        {"state": "complete", "figures": {k: f["value"] for k, f in v["figures"].items()}}
        for v in report["variants"]
        if with_search or v["name"] not in searched
    ]
    return _hv(points, s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["grid", "portfolio"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/frugalm-bench-search"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--budget",
        type=float,
        help="portfolio mode: the search's seconds (default: the portfolio's measured wall time)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"grid": grid, "portfolio": portfolio}[args.mode](args)


if __name__ == "__main__":
    main()
