"""frugalm eval MODEL --task NAME: lm-evaluation-harness tasks on a model as it runs, offline, stored.

Needs the optional extra: pip install -e '.[eval]'.
"""

from __future__ import annotations

from frugalm.cli.config_options import Option, add_options, configure

API = ("frugalm.benchmark.harness", "HarnessConfig")
OPTIONS = [
    Option("--num-fewshot", "num_fewshot", {"type": int}),
    Option("--device", "device"),
    Option("--dtype", "dtype"),
    Option("--max-length", "max_length", {"type": int}),
    Option("--bootstrap-iters", "bootstrap_iters", {"type": int}),
]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="run lm-evaluation-harness tasks on a model or variant as it runs, offline, and store the run"
    )
    p.add_argument("model", help="local Hugging Face folder, variant folder or hub id (found in the local cache)")
    p.add_argument("--task", action="append", required=True, dest="tasks", metavar="NAME",
                   help="lm-eval task, group or tag: a built-in one whose data is cached, or a YAML's under --include (repeatable)")  # fmt: skip
    p.add_argument("--include", metavar="DIR", help="folder of task YAMLs (their data files local: dataset_path: json)")
    p.add_argument("--limit", type=float, metavar="N", help="documents per task at most (below 1: a fraction of them)")
    p.add_argument("--reference", metavar="MODEL", help="score it too and pair each task's documents with it")
    p.add_argument(
        "--store", help="SQLite results store (default: $FRUGALM_STORE or ~/.local/share/frugalm/frugalm.db)"
    )
    add_options(p, OPTIONS, *API)
    p.set_defaults(func=run)


def config(args):
    """What `evaluate()` runs with by default (HarnessConfig()), with the options given."""
    from frugalm.benchmark.harness import HarnessConfig

    return configure(HarnessConfig(), OPTIONS, args)


def run(args) -> int:
    from frugalm.benchmark.harness import evaluate_and_store

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    run, measurements = evaluate_and_store(
        args.model,
        args.tasks,
        include_path=args.include,
        limit=limit,
        reference=args.reference,
        config=config(args),
        store=args.store,
    )
    print(f"run {run.id} ({run.kind}) stored: {run.model_ref}, {len(measurements)} figures")
    for m in measurements:
        print(f"  {m.workload:<40} {m.metric:<22} {_figure(m)}")
    return 0


def _figure(m) -> str:
    """The value with lm-eval's stderr, then the reference's value and the paired difference."""
    text = f"{m.value:.4f}" + (f" ± {m.spread:.4f}" if m.spread is not None else " (no stderr)") + f" (n={m.n})"
    ref = m.protocol.get("reference")
    if ref:
        text += f"; reference {ref['value']:.4f}"
    paired = m.protocol.get("paired")
    if paired:
        lo, hi = paired["ci"]
        text += f"; Δ {paired['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}] (paired, {paired['confidence']:.0%})"
    return text
