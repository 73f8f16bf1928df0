"""frugalm optimize [MODEL]: the portfolio of recipes, the Pareto front, the report, the artifacts."""

from __future__ import annotations

import sys

from frugalm.cli.bench_options import add_bench_options, bench_config
from frugalm.cli.config_options import Option, add_options, configure

OPTIMIZE = ("frugalm.optimize", "OptimizeConfig")
OPTIONS = [
    Option("--out", "out_dir", {"metavar": "DIR"}),
    Option("--recipe", "recipes", {"action": "append", "metavar": "NAME|FILE"}, "repeatable"),
    Option("--constraint", "constraints", {"action": "append", "metavar": "SPEC"}, "repeatable"),
    Option("--keep-dominated", "keep_dominated", {"action": "store_true"}),
    Option("--force", "force", {"action": "store_true"}),
    Option("--no-portfolio", "portfolio", {"action": "store_false"}),
    Option("--search", "search.trials", {"type": int, "metavar": "N"}),
    Option("--space", "search.space", {"metavar": "FILE|NAME"}),
    Option("--objective", "search.objectives", {"action": "append", "metavar": "METRIC[@WORKLOAD]"}, "repeatable"),
    Option("--search-time", "search.time_budget_s", {"type": float, "metavar": "S"}),
    Option("--sampler", "search.sampler", {"choices": ["auto", "tpe", "nsga2", "random", "grid"]}),
    Option("--search-seed", "search.seed", {"type": int}),
    Option("--no-warm-start", "search.warm_start", {"action": "store_false"}),
    Option("--screen-tokens", "search.screen_tokens", {"type": int}),
    Option("--ray", "search.ray", {"metavar": "ADDRESS|local"}),
    Option("--utility", "utility", {"action": "append", "metavar": "RESOURCE=POINTS"}, "repeatable"),
]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "optimize", help="run the recipe portfolio, find the Pareto front, write the report (the main job)"
    )
    p.add_argument("model", nargs="?", help="local Hugging Face folder or hub id (default: the built-in model)")
    add_options(p, OPTIONS, *OPTIMIZE)
    add_bench_options(p, owner=(*OPTIMIZE, "bench"))
    p.set_defaults(func=run)


def config(args):
    """What `optimize()` does by default (OptimizeConfig()), with the options given."""
    from dataclasses import replace

    from frugalm.optimize import OptimizeConfig

    base = configure(OptimizeConfig(), OPTIONS, args)
    return replace(base, bench=bench_config(args, base.bench))


def run(args) -> int:
    from frugalm.cli.progress import ProgressLine
    from frugalm.optimize import optimize

    progress = ProgressLine(enabled=not args.quiet)

    def say(line: str) -> None:
        progress.close()
        print(line, file=sys.stderr)

    try:
        result = optimize(args.model, config(args), store=args.store, progress=progress, say=say)
    finally:
        progress.close()
    print((result.out_dir / "report.md").read_text())
    print(f"report: {result.report_paths['html']}\nartifacts: {result.out_dir / 'variants'}", file=sys.stderr)
    return 0
