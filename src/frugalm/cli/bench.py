"""frugalm bench [MODEL]: the standardized five-resource scorecard of one model."""

from __future__ import annotations

from frugalm.cli.bench_options import add_bench_options, bench_config, print_result


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure one model on the standardized benchmark and store the run")
    p.add_argument("model", nargs="?", help="local Hugging Face folder or hub id (default: the built-in model)")
    p.add_argument("--reference", help="model with the same tokenizer to measure fidelity against (KL, top-1 agreement)")
    add_bench_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from frugalm.benchmark.api import bench
    from frugalm.cli.progress import ProgressLine

    progress = ProgressLine(enabled=not args.quiet)
    try:
        result = bench(args.model, bench_config(args, args.reference), store=args.store, progress=progress)
    finally:
        progress.close()
    print_result(args, result)
    return 0
