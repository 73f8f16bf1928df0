"""The Markdown summary: recommendations, fronts, and the headline figures of every variant."""

from __future__ import annotations

from frugalm.measure.metrics import METRICS
from frugalm.report.scorecard import format_value


def _cell(variant: dict, metric: str, workload: str) -> str:
    f = variant["figures"].get(f"{metric}@{workload}" if METRICS[metric].per_workload else metric)
    if not f:
        return "—"
    text = format_value(f["value"])
    if f.get("delta_pct") is not None and variant["name"] != "baseline":
        text += f" ({f['delta_pct']:+.1f}%{', ≈' if f.get('tie') else ''})"
    return text + (" *est.*" if f["method"] == "estimated" else "")


def render_markdown(d: dict) -> str:
    wl = d["workload"]["name"]
    metrics = [d["quality_metric"], *[h["metric"] for h in d["headline"].values()]]
    lines = [
        f"# frugalm report — {d['model']}",
        "",
        f"{d['benchmark_version']} · session {d['session_id']} · {d['created_at']} · {d['environment'].get('device')} · {d['environment'].get('cpu')}",
        f"Workload `{wl}`; quality `{d['quality_metric']}` on {d['protocol']['data']['data']}. *est.* marks estimated figures (profile prices, power model).",
        "",
        "## Recommended variants",
        "",
    ]
    for r in d["recommendations"]:
        best = ", ".join(f"{res}: **{b['variant']}** ({format_value(b['value'])} {METRICS[b['metric']].unit}{'; tied within noise: ' + ', '.join(b['tied']) if b.get('tied') else ''})" for res, b in r["best"].items())
        lines.append(f"- {r['constraint']}: {best or 'no variant satisfies it'}")
    lines += ["", "## Pareto fronts (quality against each resource)", ""]
    noise = ", ".join(f"`{k}` ±{100 * v:.1f}%" for k, v in d.get("noise", {}).items() if k.split("@")[0] in metrics)
    lines += [f"Run-to-run noise (baseline measured first and last): {noise or 'none measured'}. Differences within a figure's margin (its spread, this noise or 0.01% of its value, whichever is largest) are ties, marked ≈; a variant is off a front only if another beats it beyond the margins.", ""]
    for res, names in d["fronts"].items():
        lines.append(f"- {res} (`{d['headline'][res]['metric']}`): {', '.join(names)}; hypervolume {format_value(d['hypervolume'].get(res, 0))}")
    lines += ["", "## Headline figures (Δ to baseline)", ""]
    header = ["variant", *[f"{m} ({METRICS[m].unit})" for m in metrics]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in d["variants"]:
        name = v["name"] + (" ★" if v["on_front"] else "")
        lines.append("| " + " | ".join([name, *[_cell(v, m, wl) for m in metrics]]) + " |")
    if d["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {n}: {why}" for n, why in d["skipped"].items()]
    lines += ["", f"Artifacts of variants on a front: `{d['out_dir']}/variants/`. ★ = on at least one front.", ""]
    return "\n".join(lines)
