"""Options shared by every command that measures (bench, run): one definition, one BenchConfig."""

from __future__ import annotations

from frugalm.measure.workloads import DEFAULT_WORKLOADS


def add_bench_options(p) -> None:
    p.add_argument("--data", help="evaluation text, UTF-8; documents split at <|endoftext|> lines (default: built-in held-out text)")
    p.add_argument("--workload", action="append", dest="workloads", metavar="NAME", help=f"workload to run, repeatable (default: {' '.join(DEFAULT_WORKLOADS)}; see `frugalm ls workloads`)")
    p.add_argument("--metric", action="append", dest="metrics", metavar="NAME", help="report only this metric, repeatable (see `frugalm ls metrics`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--profile", help="hardware profile for money and estimated energy (see `frugalm ls profiles`)")
    p.add_argument("--profiles", dest="profiles_file", help="YAML file of extra hardware profiles")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens, capped at the model's context (default: 512)")
    p.add_argument("--stride", type=int, default=256, help="tokens between perplexity windows; = window for non-overlapping (default: 256)")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="tokens of the text to evaluate, 0 for all (default: 65536)")
    p.add_argument("--repetitions", type=int, default=5, help="timed repetitions per workload after warm-up (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up repetitions per workload (default: 1)")
    p.add_argument("--scale-workloads", action="store_true", help="scale workloads longer than the model's context to fit (recorded as scaled)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the measuring child is stopped (default: 3600)")
    p.add_argument("--store", help="SQLite results store (default: $FRUGALM_STORE or ~/.local/share/frugalm/frugalm.db)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def bench_config(args, reference: str | None = None):
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.quality import PerplexityProtocol

    return BenchConfig(
        data=args.data,
        workloads=tuple(args.workloads or DEFAULT_WORKLOADS),
        device=args.device,
        dtype=args.dtype,
        reference=reference,
        metrics=tuple(args.metrics) if args.metrics else None,
        profile=args.profile,
        profiles_file=args.profiles_file,
        protocol=PerplexityProtocol(window=args.window, stride=args.stride, max_tokens=args.eval_tokens),
        warmup=args.warmup,
        repetitions=args.repetitions,
        scale_workloads=args.scale_workloads,
        timeout_s=args.timeout,
    )


def print_result(args, result) -> None:
    import json

    from frugalm.report.scorecard import format_scorecard, scorecard_json

    if args.json:
        print(json.dumps(scorecard_json(result.run, result.measurements), indent=2))
    else:
        print(format_scorecard(result.run, result.measurements))
