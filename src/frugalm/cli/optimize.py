"""frugalm optimize [MODEL]: the portfolio of recipes, the Pareto front, the report, the artifacts."""

from __future__ import annotations

import sys

from frugalm.cli.bench_options import add_bench_options, bench_config


def add_parser(sub) -> None:
    p = sub.add_parser("optimize", help="run the recipe portfolio, find the Pareto front, write the report (the main job)")
    p.add_argument("model", nargs="?", help="local Hugging Face folder or hub id (default: the built-in model)")
    p.add_argument("--out", default="frugalm-optimize", help="output folder: report.html/.md/.json and variants/ (default: ./frugalm-optimize)")
    p.add_argument("--recipe", action="append", dest="recipes", metavar="NAME|FILE", help="recipe to include, repeatable (default: every shipped recipe)")
    p.add_argument("--constraint", action="append", dest="constraints", metavar="SPEC", help="e.g. 'ppl_tok<=+5%%' (relative to baseline) or 'peak_mem_mib<=200', repeatable (default: ppl_tok<=+5%% and <=+20%%)")
    p.add_argument("--keep-dominated", action="store_true", help="keep the artifacts of variants on no front")
    p.add_argument("--force", action="store_true", help="write into --out even if frugalm did not write it (its variants/ folders may be replaced)")
    add_bench_options(p)
    p.set_defaults(func=run, eval_tokens=16_384, repetitions=3)


def run(args) -> int:
    from frugalm.cli.progress import ProgressLine
    from frugalm.optimize import DEFAULT_CONSTRAINTS, OptimizeConfig, optimize

    config = OptimizeConfig(
        out_dir=args.out,
        recipes=tuple(args.recipes or ()),
        bench=bench_config(args),
        constraints=tuple(args.constraints or DEFAULT_CONSTRAINTS),
        keep_dominated=args.keep_dominated,
        force=args.force,
    )
    progress = ProgressLine(enabled=not args.quiet)

    def say(line: str) -> None:
        progress.close()
        print(line, file=sys.stderr)

    try:
        result = optimize(args.model, config, store=args.store, progress=progress, say=say)
    finally:
        progress.close()
    print((result.out_dir / "report.md").read_text())
    print(f"report: {result.report_paths['html']}\nartifacts: {result.out_dir / 'variants'}", file=sys.stderr)
    return 0
