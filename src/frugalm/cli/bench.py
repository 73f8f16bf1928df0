"""frugalm bench [MODEL]: the standardized five-resource scorecard of one model."""

from __future__ import annotations

from frugalm.cli.bench_options import API, BENCH_OPTIONS, add_bench_options, print_result
from frugalm.cli.config_options import Option, add_options, configure

OPTIONS = [Option("--reference", "reference"), *BENCH_OPTIONS]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure one model on the standardized benchmark and store the run")
    p.add_argument("model", nargs="?", help="local Hugging Face folder or hub id (default: the built-in model)")
    add_options(p, OPTIONS[:1], *API)
    add_bench_options(p)
    p.set_defaults(func=run)


def config(args):
    """What `bench()` measures with by default (BenchConfig()), with the options given."""
    from frugalm.benchmark.api import BenchConfig

    return configure(BenchConfig(), OPTIONS, args)


def run(args) -> int:
    from frugalm.benchmark.api import bench
    from frugalm.cli.progress import ProgressLine

    progress = ProgressLine(enabled=not args.quiet)
    try:
        result = bench(args.model, config(args), store=args.store, progress=progress)
    finally:
        progress.close()
    print_result(args, result)
    return 0
