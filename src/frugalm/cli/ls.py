"""frugalm ls runs|metrics|workloads|profiles|techniques: what exists, as a table or as JSON.

Each kind is listed as data first (one JSON-ready document); the table is drawn from that
document, so `--json` and the table never disagree.
"""

from __future__ import annotations

KINDS = ("runs", "metrics", "workloads", "profiles", "techniques")
WHAT = {
    "runs": "stored runs",
    "metrics": "the benchmark's metrics",
    "workloads": "the inference workloads",
    "profiles": "hardware profiles",
    "techniques": "techniques and their options",
}


def add_parser(sub) -> None:
    kinds = ", ".join(f"{k} ({WHAT[k]})" for k in KINDS)
    p = sub.add_parser(
        "ls", help=f"list {', '.join(KINDS[:-1])} or {KINDS[-1]}", description=f"List what exists: {kinds}."
    )
    p.add_argument("what", choices=KINDS, help=f"what to list: {', '.join(KINDS)}")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--store", help="SQLite results store (for runs)")
    p.add_argument("--profiles", dest="profiles_file", help="YAML file of extra hardware profiles (for profiles)")
    p.add_argument("--limit", type=int, default=50, help="most recent runs to list (default: 50)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    data, text = LISTERS[args.what]
    doc = data(args)
    print(json.dumps(doc, indent=2) if args.json else text(doc))
    return 0


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple("" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def _runs(args) -> dict:
    from frugalm.store import Store

    with Store(args.store) as store:
        runs = [
            {
                "id": r.id,
                "created_at": r.created_at,
                "kind": r.kind,
                "status": r.status,
                "model_ref": r.model_ref,
                "model_path": r.model_path,
                "benchmark_version": r.benchmark_version,
                "wall_s": r.wall_s,
                "key": r.key,
                "figures": len(store.measurements(r.id)),
                "error": r.error,
            }
            for r in store.runs(args.limit)
        ]
    return {"store": str(store.path), "runs": runs}


def _runs_text(doc: dict) -> str:
    if not doc["runs"]:
        return f"no runs in {doc['store']}"
    rows = [
        (
            r["id"],
            r["created_at"],
            r["kind"],
            r["status"],
            r["model_ref"],
            r["benchmark_version"],
            f"{r['wall_s'] or 0:.1f}",
            r["figures"],
            (r["error"] or "")[:60],
        )
        for r in doc["runs"]
    ]
    return _table(rows, ("id", "created", "kind", "status", "model", "benchmark", "wall_s", "figures", "error"))


def _metrics(args) -> dict:
    from dataclasses import asdict

    from frugalm.measure.metrics import BENCHMARK_VERSION, METRICS

    return {"benchmark_version": BENCHMARK_VERSION, "metrics": [asdict(m) for m in METRICS.values()]}


def _metrics_text(doc: dict) -> str:
    rows = [
        (
            m["name"],
            m["resource"],
            m["unit"],
            "higher" if m["higher_is_better"] else "lower",
            m["method"],
            "yes" if m["per_workload"] else "",
            m["description"],
        )
        for m in doc["metrics"]
    ]
    return f"{doc['benchmark_version']}\n" + _table(
        rows, ("metric", "resource", "unit", "better", "method", "per workload", "description")
    )


def _workloads(args) -> dict:
    from frugalm.measure.workloads import DEFAULT_WORKLOADS, WORKLOADS

    return {"workloads": [{**w.to_dict(), "default": w.name in DEFAULT_WORKLOADS} for w in WORKLOADS.values()]}


def _workloads_text(doc: dict) -> str:
    rows = [
        (
            w["name"],
            w["prompt_tokens"],
            w["output_tokens"],
            w["batch_size"],
            "yes" if w["default"] else "",
            w["description"],
        )
        for w in doc["workloads"]
    ]
    return _table(rows, ("workload", "prompt", "output", "batch", "default", "description"))


def _profiles(args) -> dict:
    from frugalm.measure.cost import load_profiles

    return {"profiles": [p.to_dict() for p in load_profiles(args.profiles_file).values()]}


def _profiles_text(doc: dict) -> str:
    rows = [
        (
            p["name"],
            p["usd_per_hour"],
            p["usd_per_kwh"],
            p["gco2e_per_kwh"],
            p["watts_idle"],
            p["watts_max"],
            p["description"],
        )
        for p in doc["profiles"]
    ]
    return _table(rows, ("profile", "usd/h", "usd/kWh", "gCO2e/kWh", "W idle", "W max", "description"))


def _techniques(args) -> dict:
    """Generated from the registry: each technique, then each option with its type, default and doc."""
    import importlib

    from frugalm.recipe import option_docs
    from frugalm.registry import TECHNIQUES, get_technique

    out = []
    for name in TECHNIQUES:
        t = get_technique(name)
        doc = importlib.import_module(t.apply.__module__).__doc__ or ""
        out.append(
            {
                "name": name,
                "kind": t.kind,
                "needs_calibration": "some options" if callable(t.needs_calibration) else bool(t.needs_calibration),
                "summary": doc.strip().splitlines()[0] if doc.strip() else "",
                "options": [
                    {"name": opt, "type": tp, "default": default, "doc": text}
                    for opt, tp, default, text in option_docs(t.config_cls)
                ],
            }
        )
    return {"techniques": out}


def _techniques_text(doc: dict) -> str:
    calibration = {True: ", needs calibration", False: "", "some options": ", needs calibration for some options"}
    blocks = []
    for t in doc["techniques"]:
        lines = [f"{t['name']}  [{t['kind']}{calibration[t['needs_calibration']]}]  {t['summary']}"]
        lines += [f"    {o['name']}: {o['type']} = {o['default']!r}  {o['doc']}" for o in t["options"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no techniques registered"


LISTERS = {
    "runs": (_runs, _runs_text),
    "metrics": (_metrics, _metrics_text),
    "workloads": (_workloads, _workloads_text),
    "profiles": (_profiles, _profiles_text),
    "techniques": (_techniques, _techniques_text),
}
assert tuple(LISTERS) == KINDS
