"""Report data: a pure function of stored runs -> one dict that every renderer (HTML, Markdown, JSON) reads.

The headline figure of each resource, plotted against quality, is named in HEADLINE; the
direction of every metric comes from the registry. Figures carry their method so renderers
can mark estimates as estimates.

Differences within the noise are ties. Speed, energy and money are compared by paired speedups
where every variant has them (optimize measures each variant against the baseline in one process,
interleaved; measure/paired.py): the headlines become speedup_decode, energy_ratio_decode and
cost_ratio_decode, the baseline is 1 by definition, and a variant is faster (cheaper) or slower
only when its 95% interval excludes 1. Every other figure gets a margin: the largest of its spread
over the repetitions of its run, the run-to-run noise, which optimize measures by benchmarking the
baseline twice, first and last (|difference| / mean, per metric), and RESOLUTION of its value
(float rounding: a KV cache that dequantizes exactly, or another kernel summing in another
order, moves a perplexity in its fifth digit, which is no difference in quality). A figure with
an interval has its half-width as margin. Two figures tie when they differ by no more than the
sum of their margins; fronts, Δ markers (each figure's `verdict`) and recommendations all use
that rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from frugalm.atomic import write_text_atomic
from frugalm.measure.metrics import METRICS, OVERHEAD_BOUND, Measurement, get_metric
from frugalm.measure.paired import ratio_interval
from frugalm.pareto import Constraint, hypervolume, non_dominated, satisfying
from frugalm.report.html import render_html
from frugalm.report.markdown import render_markdown
from frugalm.report.scorecard import kernel_line, kernel_protocol, speed_kernel_note
from frugalm.report.utility import parse_rates, utility_ranking
from frugalm.store import Run, Store

QUALITY = "ppl_tok"
RESOLUTION = 1e-4
"""Relative differences below this are float rounding, never a result (see module doc)."""
# resource -> (metric, per workload?)
HEADLINE = {
    "computation": "decode_tok_s",
    "memory": "peak_mem_mib",
    "weights": "weights_mib",
    "energy": "energy_j_per_tok",
    "money": "cost_usd_per_mtok",
    "network": "ship_compressed_mib",
}


PAIRED_HEADLINE = {"computation": "speedup_decode", "energy": "energy_ratio_decode", "money": "cost_ratio_decode"}
"""The headlines where every variant was timed against the baseline (ratios with 95% intervals)."""
PAIRED_METRICS = ("speedup_ttft", "speedup_decode", "energy_ratio_decode", "cost_ratio_decode")
SPEEDUPS = ("speedup_ttft", "speedup_decode")
CONFIDENCE = 0.95


def _figure_key(metric: str, workload: str | None) -> str:
    return f"{metric}@{workload}" if workload else metric


SPEED_METRICS = tuple(
    name for name, m in METRICS.items() if m.resource == "computation" and m.method == "measured" and m.per_workload
)
"""Timed figures of a workload: a dequantizing variant's are marked "no speed kernel" beside them."""


def _figures(measurements: list[Measurement]) -> dict[str, dict]:
    return {
        _figure_key(m.metric, m.workload): {
            "metric": m.metric,
            "workload": m.workload,
            "value": m.value,
            "unit": m.unit,
            "method": m.method,
            "n": m.n,
            "spread": m.spread,
            **({"ci": m.protocol["ci"]} if "ci" in m.protocol else {}),
            **({"paired": _paired(m.protocol["paired"])} if "paired" in m.protocol else {}),
        }
        for m in measurements
    }


def _paired(p: dict) -> dict:
    """A task figure's difference to the reference on the same items, with its paired 95% interval."""
    return {k: p[k] for k in ("delta", "ci", "ci_unpaired", "items", "discordant", "reference_value") if k in p}


def _entry(db: Store, run: Run, name: str, recipe: dict | None) -> dict:
    """A run as the report reads it: its figures, and its kernel summary (formats named) and "no speed
    kernel" note from the measuring child's protocols. The store is read once per run."""
    measurements = db.measurements(run.id)
    return {"name": name, "run": run, "measurements": measurements, "figures": _figures(measurements),
            "recipe": recipe, **_kernels(measurements)}  # fmt: skip


def _kernels(measurements: list[Measurement]) -> dict:
    return {"kernels": kernel_line(kernel_protocol(measurements)), "speed_kernel": speed_kernel_note(measurements),
            "decoding": decoding_note(measurements)}  # fmt: skip


def decoding_note(measurements: list[Measurement]) -> str | None:
    """How a variant with a decoding strategy generated, per batch-1 workload, from its stored counts and ratios."""
    by = {(m.metric, m.workload): m for m in measurements}
    parts = []
    for workload in sorted({w for metric, w in by if metric == "target_fwd_per_tok"}):
        setting = by[("target_fwd_per_tok", workload)].protocol.get("decoding") or {}
        bits = [f"{by[('target_fwd_per_tok', workload)].value:.3f} forwards per token"]
        if ("accept_rate", workload) in by:
            bits.insert(0, f"{by[('accept_rate', workload)].value:.3f} of guesses kept")
        if ("greedy_agree_frac", workload) in by:
            bits.append(f"{by[('greedy_agree_frac', workload)].value:.3f} of tokens as plain greedy decoding")
        if ("speedup_strategy", workload) in by:
            m = by[("speedup_strategy", workload)]
            lo, hi = m.protocol.get("ci", [m.value, m.value])
            bits.append(f"{m.value:.3f}x [{lo:.3f}, {hi:.3f}] over its own plain decoding")
        parts.append(f"{setting.get('method', 'strategy')} on {workload}: " + ", ".join(bits))
    return "; ".join(parts) or None


def _headline_point(figures: dict, workload: str, headline: dict, field: str = "value") -> dict[str, float]:
    point = {}
    for metric in [QUALITY, *headline.values()]:
        key = _figure_key(metric, workload if get_metric(metric).per_workload else None)
        if key in figures:
            point[metric] = figures[key][field]
    return point


def _run_to_run_noise(first: dict, second: dict) -> dict[str, float]:
    """Per figure key, |a - b| / mean(a, b) between two runs of the same model and settings (figures with an interval aside)."""
    out = {}
    for key, a in first.items():
        b = second.get(key)
        if b is not None and "ci" not in a and a["value"] + b["value"]:
            out[key] = abs(a["value"] - b["value"]) / abs((a["value"] + b["value"]) / 2)
    return out


def _reference_figures(entries: list[dict]) -> dict[str, dict]:
    """The baseline's paired figures: 1 by definition (it is the reference), margin 0."""
    out = {}
    for e in entries[1:]:
        for key, f in e["figures"].items():
            if f["metric"] in PAIRED_METRICS:
                out[key] = {"metric": f["metric"], "workload": f["workload"], "value": 1.0, "unit": f["unit"],
                            "method": "reference", "n": 1, "spread": 0.0, "ci": [1.0, 1.0]}  # fmt: skip
    return out


def _simultaneous_intervals(entries: list[dict]) -> dict | None:
    """Widen every variant's speedup interval so that all of them hold together at 95% (Bonferroni).

    With 15 variants each judged at 95%, about one "faster" or "slower" call in a report would be
    chance; on this project's machine, variants running the very same kernels as the baseline were
    called 1.10x faster and 0.99x slower that way. So with m variants each interval is recomputed
    from its stored per-block ratios at 1 - 0.05/m (Student t, as measured; measure/paired.py), and
    the derived energy and cost ratios inverted from the decode one. The 95% interval of the
    figure alone stays in `ci_alone`.
    """
    compared = [e for e in entries[1:] if any(f["metric"] in SPEEDUPS for f in e["figures"].values())]
    if len(compared) < 2:
        return None
    each = 1 - (1 - CONFIDENCE) / len(compared)
    for e in compared:
        for m in e["measurements"]:
            f = e["figures"].get(_figure_key(m.metric, m.workload))
            if m.metric not in SPEEDUPS or not m.samples or len(m.samples) < 2 or f is None:
                continue
            _, lo, hi, _ = ratio_interval([math.log(x) for x in m.samples], each)
            f.update(ci_alone=f.get("ci"), ci=[lo, hi], spread=(hi - lo) / 2)
            if m.metric == "speedup_decode":
                for name in ("energy_ratio_decode", "cost_ratio_decode"):
                    g = e["figures"].get(_figure_key(name, m.workload))
                    if g is not None:
                        g.update(ci_alone=g.get("ci"), ci=[1 / hi, 1 / lo], spread=(1 / lo - 1 / hi) / 2)
    return {"variants": len(compared), "confidence": CONFIDENCE, "each": each, "method": "Bonferroni"}


def build_report_data(db: Store, session: Run, rates: dict[str, float] | None = None) -> dict:
    """Everything a report shows, from the store: baseline, variants, fronts, recommendations, and the
    utility ranking at `rates` (default: the session's own, else utility.DEFAULT_RATES)."""
    cfg = session.config
    base_run = db.get_run(cfg["baseline"])
    workload = base_run.config["workloads"][0]["name"]
    entries = [_entry(db, base_run, "baseline", None)]
    base_fig = entries[0]["figures"]
    for name, run_id in cfg["variants"].items():
        if run_id:
            run = db.get_run(run_id)
            entries.append(_entry(db, run, name, run.config.get("variant", {}).get("recipe")))
    control = _entry(db, db.get_run(cfg["control"]), "control", None) if cfg.get("control") else None
    control_fig = control["figures"] if control else {}
    noise = _run_to_run_noise(base_fig, control_fig)
    paired = len(entries) > 1 and all(f"speedup_decode@{workload}" in e["figures"] for e in entries[1:])
    headline = {**HEADLINE, **(PAIRED_HEADLINE if paired else {})}
    simultaneous = _simultaneous_intervals(entries)
    base_fig.update(_reference_figures(entries))
    for e in entries:
        for key, f in e["figures"].items():
            f["margin"] = (
                (f["paired"]["ci"][1] - f["paired"]["ci"][0]) / 2
                if "paired" in f
                else f["spread"] or 0.0
                if "ci" in f
                else max(f["spread"] or 0.0, max(noise.get(key, 0.0), RESOLUTION) * abs(f["value"]))
            )
    points = [_headline_point(e["figures"], workload, headline) for e in entries]
    margins = [_headline_point(e["figures"], workload, headline, "margin") for e in entries]
    fronts, volumes = {}, {}
    for resource, metric in headline.items():
        have = [i for i, p in enumerate(points) if QUALITY in p and metric in p]
        sub = [points[i] for i in have]
        front = [have[j] for j in non_dominated(sub, (QUALITY, metric), [margins[i] for i in have])] if sub else []
        fronts[resource] = [entries[i]["name"] for i in front]
        if sub:
            ref = {QUALITY: max(p[QUALITY] for p in sub) * 1.1, metric: _reference(metric, [p[metric] for p in sub])}
            volumes[resource] = hypervolume(sub, (QUALITY, metric), ref)
    on_front = {n for names in fronts.values() for n in names}
    variants = [_variant_row(e, base_fig, on_front, fronts, workload) for e in entries]
    return {
        "session_id": session.id,
        "model": session.model_ref,
        "created_at": session.created_at,
        "benchmark_version": session.benchmark_version,
        "environment": base_run.environment,
        "workload": base_run.config["workloads"][0],
        "quality_metric": QUALITY,
        "headline": {r: {"metric": m, **_metric_info(m)} for r, m in headline.items()},
        "metrics": {name: _metric_info(name) for name in METRICS},
        "speed_metrics": list(SPEED_METRICS),
        "variants": variants,
        "skipped": cfg.get("skipped", {}),
        "fronts": fronts,
        "hypervolume": volumes,
        "utility": utility_ranking(variants, headline, workload, rates or parse_rates(cfg.get("utility") or ())),
        "recommendations": _recommendations(cfg.get("constraint_specs", []), points, margins, entries, headline),
        "noise": {k: v for k, v in noise.items() if v > 0},
        "tie_rule": _tie_rule(paired, simultaneous),
        "simultaneous": simultaneous,
        "self_check": _self_check(control_fig, workload),
        "warnings": _warnings(entries + ([control] if control else []), base_fig),
        "out_dir": cfg.get("out_dir"),
        "search": cfg.get("search"),
        "protocol": {
            k: base_run.config.get(k)
            for k in ("data", "protocol", "workloads", "profile", "repetitions", "warmup", "device", "dtype")
        },
    }


def _tie_rule(paired: bool, simultaneous: dict | None) -> str:
    together = (
        f"the intervals shown hold together at 95% over the {simultaneous['variants']} variants (Bonferroni: each "
        f"at {100 * simultaneous['each']:.2f}%), so each faster or slower call is not one chance in twenty; "
        if simultaneous
        else ""
    )
    speed = (
        "Speed, energy and money are compared by paired ratios: each variant was timed against the baseline in one "
        f"process, interleaved (ABBA blocks), for a confidence interval; {together}a variant is faster (cheaper) or "
        "slower only when its interval excludes 1, and two variants tie when their ratios differ by no more than the "
        "sum of their half-widths. Energy and money ratios follow from the decode speedup at equal power (estimated). "
        if paired
        else "Speed, energy and money figures were timed in separate processes (no paired speedups): they tie within "
        "the run-to-run noise below. "
    )
    return (
        speed + "Every other figure ties within its margin: the largest of its spread over repetitions, the run-to-run "
        "noise (the baseline measured first and last) and 0.01% of its value; a variant leaves a front only if another "
        "beats it beyond the margins. Absolute times (tok/s, ms) are this machine's, as measured, with their spread."
    )


def _self_check(control_fig: dict, workload: str) -> dict | None:
    """The baseline timed against itself (optimize's control run): its interval should contain 1."""
    f = control_fig.get(f"speedup_decode@{workload}")
    if not f or "ci" not in f:
        return None
    lo, hi = f["ci"]
    return {"metric": "speedup_decode", "workload": workload, "value": f["value"], "ci": [lo, hi],
            "halfwidth": (hi - lo) / 2, "contains_1": lo <= 1 <= hi}  # fmt: skip


def _warnings(runs: list[dict], base_fig: dict) -> list[dict]:
    """Competing load during any timing of the runs (report entries), and decode figures that are overhead-bound on this model."""
    out = []
    competed, worst = set(), 0.0
    for run in runs:
        for m in run["measurements"]:
            if m.protocol.get("competed"):
                competed.add(run["run"].id)
                worst = max(worst, m.protocol.get("other_cores", 0.0))
    if competed:
        out.append(
            {
                "kind": "competing_load",
                "text": f"other processes competed for the cores during the timing of {len(competed)} of {len(runs)} "
                f"runs (up to {worst:.2f} cores on average, from /proc/stat): their intervals are wider and their "
                "absolute times slower than on an idle machine; rerun when the machine is idle for tighter figures",
            }
        )
    bound = {
        f["workload"]: f["value"]
        for f in base_fig.values()
        if f["metric"] == "decode_overhead_frac" and f["value"] >= OVERHEAD_BOUND
    }
    if bound:
        where = ", ".join(f"{w} {min(v, 1.0):.0%}" for w, v in sorted(bound.items()))
        out.append(
            {
                "kind": "overhead_bound",
                "text": f"decode is overhead-bound on this model: fixed per-step cost (Python, dispatch, cache "
                f"bookkeeping), estimated with a width-shrunk twin, takes {where} of the baseline's decode step, so no "
                "change to the weights can speed its decode much; its decode figures (speedup_decode, decode_tok_s, "
                "tpot) compare mostly that fixed cost, and the time to first token (many tokens per call) shows "
                "compute savings better. On a larger model these figures differ.",
            }
        )
    return out


def _reference(metric: str, values: list[float]) -> float:
    """A point a little worse than every variant on `metric`, for the hypervolume."""
    if get_metric(metric).higher_is_better:
        return min(values) * 0.9
    return max(values) * 1.1


def _metric_info(name: str) -> dict:
    m = get_metric(name)
    return {
        "unit": m.unit,
        "higher_is_better": m.higher_is_better,
        "resource": m.resource,
        "description": m.description,
    }


def _variant_row(entry: dict, base_fig: dict, on_front: set, fronts: dict, workload: str) -> dict:
    figs = entry["figures"]
    for key, f in figs.items():
        base = base_fig.get(key)
        f["delta_pct"] = 100 * (f["value"] / base["value"] - 1) if base and base["value"] else None
        f["verdict"] = _verdict(f, base) if base and entry["name"] != "baseline" else None
        f["tie"] = f["verdict"] == "tie" and f["delta_pct"] != 0
    run = entry["run"]
    variant = run.config.get("variant", {})
    return {
        "name": entry["name"],
        "run_id": run.id,
        "figures": figs,
        "on_front": entry["name"] in on_front,
        "fronts": [r for r, names in fronts.items() if entry["name"] in names],
        "recipe": entry["recipe"],
        "kernels": entry["kernels"],
        "speed_kernel": entry["speed_kernel"],
        "decoding": entry["decoding"],
        "changes": variant.get("changes", []),
        "produce_wall_s": variant.get("produce_wall_s"),
        "artifact": run.model_path,
        "environment": run.environment,
        "workload": workload,
    }


def _verdict(f: dict, base: dict) -> str:
    """'better', 'worse' or 'tie' against the baseline's figure: by the interval where the figure has one
    (a ratio to the baseline: tie when it contains the baseline's value; a task accuracy's paired
    difference to the baseline on the same items: tie when it contains 0), else by the margins."""
    if "paired" in f:
        lo, hi = f["paired"]["ci"]
        if lo <= 0 <= hi:
            return "tie"
        above = lo > 0
    elif "ci" in f and base["method"] == "reference":
        lo, hi = f["ci"]
        if lo <= base["value"] <= hi:
            return "tie"
        above = lo > base["value"]
    else:
        if abs(f["value"] - base["value"]) <= f["margin"] + base["margin"]:
            return "tie"
        above = f["value"] > base["value"]
    return "better" if above == get_metric(f["metric"]).higher_is_better else "worse"


def _recommendations(
    specs: list[str], points: list[dict], margins: list[dict], entries: list[dict], headline: dict
) -> list[dict]:
    """Per constraint: which variants satisfy it, and the best of them on each resource.

    The variants whose figure ties with the best one (within their margins) are listed as tied;
    among them the one with the best quality is recommended, and among those tied on quality
    too, the one with the best figure.
    """
    out = []
    for spec in specs:
        c = Constraint.parse(spec)
        ok = satisfying(points, [c], points[0])  # points[0] is the baseline
        best = {}
        for resource, metric in headline.items():
            cands = [i for i in ok if metric in points[i]]
            if cands:
                better = max if get_metric(metric).higher_is_better else min
                top = better(cands, key=lambda i: points[i][metric])
                tied = [i for i in cands if _tie(points[i], margins[i], points[top], margins[top], metric)]
                q = min(tied, key=lambda i: points[i].get(QUALITY, float("inf")))
                same_quality = [i for i in tied if _tie(points[i], margins[i], points[q], margins[q], QUALITY)]
                pick = better(same_quality, key=lambda i: points[i][metric])
                best[resource] = {
                    "variant": entries[pick]["name"],
                    "value": points[pick][metric],
                    "metric": metric,
                    "tied": [entries[i]["name"] for i in tied if i != pick],
                }
        out.append(
            {
                "constraint": str(c),
                "bound": c.bound(points[0].get(c.metric)),
                "satisfied_by": [entries[i]["name"] for i in ok],
                "best": best,
            }
        )
    return out


def _tie(a: dict, margin_a: dict, b: dict, margin_b: dict, metric: str) -> bool:
    """a and b differ on `metric` by no more than the sum of their margins (a missing figure ties)."""
    if metric not in a or metric not in b:
        return True
    return abs(a[metric] - b[metric]) <= margin_a.get(metric, 0.0) + margin_b.get(metric, 0.0)


def write_reports(data: dict, out_dir: Path) -> dict[str, Path]:
    """report.html, report.md and report.json in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return render_all(data, out_dir / "report")


def render_all(data: dict, stem: Path) -> dict[str, Path]:
    """Write STEM.html, STEM.md and STEM.json, each atomically (complete or absent)."""

    paths = {"html": stem.with_suffix(".html"), "md": stem.with_suffix(".md"), "json": stem.with_suffix(".json")}
    write_text_atomic(paths["json"], json.dumps(data, indent=2, default=str))
    write_text_atomic(paths["md"], render_markdown(data))
    write_text_atomic(paths["html"], render_html(data))
    return paths
