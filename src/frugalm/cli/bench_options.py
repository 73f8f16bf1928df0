"""Options shared by every command that measures (bench, run, optimize): generated from BenchConfig.

Each option's help and default come from its BenchConfig (or PerplexityProtocol) field; a
command passes the config its API call starts from (`frugalm optimize` measures with
OptimizeConfig's bench settings), so the command line and Python run the same protocol.
"""

from __future__ import annotations

import argparse

from frugalm.cli.config_options import Option, add_options, configure

API = ("frugalm.benchmark.api", "BenchConfig")
BENCH_OPTIONS = [
    Option("--data", "data"),
    Option(
        "--workload", "workloads", {"action": "append", "metavar": "NAME"}, "repeatable; see `frugalm ls workloads`"
    ),
    Option("--metric", "metrics", {"action": "append", "metavar": "NAME"}, "repeatable; see `frugalm ls metrics`"),
    Option("--device", "device"),
    Option("--dtype", "dtype"),
    Option("--profile", "profile", {}, "see `frugalm ls profiles`"),
    Option("--profiles", "profiles_file", {"metavar": "FILE"}),
    Option("--window", "protocol.window", {"type": int}),
    Option("--stride", "protocol.stride", {"type": int}),
    Option("--eval-tokens", "protocol.max_tokens", {"type": int}),
    Option("--robust-tokens", "protocol.robust_tokens", {"type": int}),
    Option("--task", "tasks.tasks", {"action": "append", "metavar": "NAME"}, "repeatable: cloze, choice, code"),
    Option("--task-items", "tasks.items", {"type": int}),
    Option("--task-context", "tasks.context_tokens", {"type": int}),
    Option("--task-choices", "tasks.choices", {"type": int}),
    Option("--repetitions", "repetitions", {"type": int}),
    Option("--warmup", "warmup", {"type": int}),
    Option("--scale-workloads", "scale_workloads", {"action": "store_true"}),
    Option("--timeout", "timeout_s", {"type": float}),
    Option("--threads", "threads", {"type": int}),
    Option("--cpus", "cpus", {"type": int, "action": "append", "metavar": "N"}, "repeatable"),
    Option("--compile", "compile", {"action": "store_true"}),
    Option("--attn-implementation", "attn_implementation", {"metavar": "NAME"}),
    Option("--speedup", "speedup", {"type": lambda text: yes_no(text), "metavar": "yes|no"}, "needs --reference"),
    Option("--speedup-workload", "speedup_workloads", {"action": "append", "metavar": "NAME"}, "repeatable"),
    Option("--speedup-target", "paired.target_halfwidth", {"type": float}),
    Option("--speedup-budget", "paired.budget_s", {"type": float}),
]


def yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1", "on"):
        return True
    if text.lower() in ("no", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def add_bench_options(p, owner: tuple[str, str, str] | None = None) -> None:
    """`owner`: (module, class, field) whose BenchConfig default the command measures with (None: BenchConfig())."""
    add_options(p, BENCH_OPTIONS, *API, owner=owner)
    p.add_argument(
        "--store", help="SQLite results store (default: $FRUGALM_STORE or ~/.local/share/frugalm/frugalm.db)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def bench_config(args, base):
    """`base` (the API's default for the command) with the options given on the command line."""
    return configure(base, BENCH_OPTIONS, args)


def print_result(args, result) -> None:
    import json

    from frugalm.report.scorecard import format_scorecard, scorecard_json

    if args.json:
        print(json.dumps(scorecard_json(result.run, result.measurements), indent=2))
    else:
        print(format_scorecard(result.run, result.measurements))
