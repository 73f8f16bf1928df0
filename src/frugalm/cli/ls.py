"""frugalm ls runs|metrics|workloads|profiles: what exists."""

from __future__ import annotations

KINDS = ("runs", "metrics", "workloads", "profiles", "techniques")


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list stored runs, metrics, workloads or hardware profiles")
    p.add_argument("what", choices=KINDS)
    p.add_argument("--store", help="SQLite results store (for runs)")
    p.add_argument("--profiles", dest="profiles_file", help="YAML file of extra hardware profiles (for profiles)")
    p.add_argument("--limit", type=int, default=50, help="most recent runs to list (default: 50)")
    p.set_defaults(func=run)


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def run(args) -> int:
    print(LISTERS[args.what](args))
    return 0


def _runs(args) -> str:
    from frugalm.store import Store

    with Store(args.store) as store:
        runs = store.runs(args.limit)
        rows = [(r.id, r.created_at, r.kind, r.status, r.model_ref, r.benchmark_version, f"{r.wall_s or 0:.1f}", len(store.measurements(r.id)), (r.error or "")[:60]) for r in runs]
    if not rows:
        return f"no runs in {store.path}"
    return _table(rows, ("id", "created", "kind", "status", "model", "benchmark", "wall_s", "figures", "error"))


def _metrics(args) -> str:
    from frugalm.measure.metrics import BENCHMARK_VERSION, METRICS

    rows = [(m.name, m.resource, m.unit, "higher" if m.higher_is_better else "lower", m.method, "yes" if m.per_workload else "", m.description) for m in METRICS.values()]
    return f"{BENCHMARK_VERSION}\n" + _table(rows, ("metric", "resource", "unit", "better", "method", "per workload", "description"))


def _workloads(args) -> str:
    from frugalm.measure.workloads import DEFAULT_WORKLOADS, WORKLOADS

    rows = [(w.name, w.prompt_tokens, w.output_tokens, w.batch_size, "yes" if w.name in DEFAULT_WORKLOADS else "", w.description) for w in WORKLOADS.values()]
    return _table(rows, ("workload", "prompt", "output", "batch", "default", "description"))


def _profiles(args) -> str:
    from frugalm.measure.cost import load_profiles

    rows = [(p.name, p.usd_per_hour, p.usd_per_kwh, p.gco2e_per_kwh, p.watts_idle, p.watts_max, p.description) for p in load_profiles(args.profiles_file).values()]
    return _table(rows, ("profile", "usd/h", "usd/kWh", "gCO2e/kWh", "W idle", "W max", "description"))


def _techniques(args) -> str:
    """Generated from the registry: each technique, then each option with its type, default and doc."""
    from frugalm.recipe import option_docs
    from frugalm.registry import TECHNIQUES, get_technique

    blocks = []
    for name in TECHNIQUES:
        t = get_technique(name)
        module = __import__(t.apply.__module__, fromlist=["_"])
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        lines = [f"{name}  [{t.kind}{'' if not t.needs_calibration else ', needs calibration' if t.needs_calibration is True else ', needs calibration for some options'}]  {summary}"]
        lines += [f"    {opt}: {tp} = {default!r}  {doc}" for opt, tp, default, doc in option_docs(t.config_cls)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no techniques registered"


LISTERS = {"runs": _runs, "metrics": _metrics, "workloads": _workloads, "profiles": _profiles, "techniques": _techniques}
