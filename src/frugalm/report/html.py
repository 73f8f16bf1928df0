"""The HTML report: one self-contained file (inline CSS, SVG and a few lines of JS; no network).

Plots are SVG drawn here, so the file opens anywhere offline. Each point carries its recipe and
figures in a `data-tip` attribute shown on hover (and in an SVG <title> for browsers without
scripts). Estimated figures are drawn hollow and dashed and labelled "estimated". The speed
figures of a variant whose quantized layers ran dequantized carry a "no speed kernel" badge.

Names and paths come from users (recipe names, model paths): everything is escaped, by jinja's
autoescape in the template and html.escape here, and the JSON embedded in a <script> has its
<, > and & written as JSON unicode escapes, so no "</script>" or "<!--" in a string can end or bend it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from frugalm.measure.metrics import METRICS
from frugalm.report.scorecard import format_value

TEMPLATE_DIR = Path(__file__).resolve().parent
W, H, PAD_L, PAD_B, PAD_T, PAD_R = 420, 300, 64, 46, 16, 16


def _scale(values: list[float], lo_px: float, hi_px: float, log: bool):
    lo, hi = min(values), max(values)
    if log and lo > 0 and hi / lo > 20:
        f = math.log10
        lo, hi = f(lo), f(hi)
    else:
        f, log = (lambda v: v), False
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    span = hi - lo
    lo, hi = lo - 0.06 * span, hi + 0.06 * span
    return (lambda v: lo_px + (f(v) - lo) / (hi - lo) * (hi_px - lo_px)), (lo, hi, log)


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10**e for e in range(math.ceil(lo), math.floor(hi) + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) / 4)) if hi > lo else 1
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def scatter_svg(data: dict, resource: str) -> str:
    """Quality (y) against one resource's headline metric (x), front points filled and joined."""
    head = data["headline"][resource]
    metric, q = head["metric"], data["quality_metric"]
    rows = []
    for v in data["variants"]:
        fx, fy = _fig(v, metric, data), _fig(v, q, data)
        if fx and fy:
            rows.append((v, fx, fy))
    if len(rows) < 1:
        return "<p class=muted>no figures for this resource</p>"
    sx, (xlo, xhi, xlog) = _scale([fx["value"] for _, fx, _ in rows], PAD_L, W - PAD_R, log=True)
    sy, (ylo, yhi, ylog) = _scale([fy["value"] for _, _, fy in rows], H - PAD_B, PAD_T, log=False)
    front = set(data["fronts"].get(resource, []))
    estimated = any(fx["method"] == "estimated" for _, fx, _ in rows)
    parts = [
        f'<svg class=plot viewBox="0 0 {W} {H}" role=img aria-label="{html.escape(q)} against {html.escape(metric)}">'
    ]
    for t in _ticks(xlo, xhi, xlog):
        x = sx(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{PAD_T}" x2="{x:.1f}" y2="{H - PAD_B}" class=grid /><text x="{x:.1f}" y="{H - PAD_B + 14}" class=tick text-anchor=middle>{format_value(t)}</text>'
        )
    for t in _ticks(ylo, yhi, ylog):
        y = sy(t)
        parts.append(
            f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W - PAD_R}" y2="{y:.1f}" class=grid /><text x="{PAD_L - 6}" y="{y + 4:.1f}" class=tick text-anchor=end>{format_value(t)}</text>'
        )
    better = "higher is better →" if head["higher_is_better"] else "← lower is better"
    xlabel = f"{metric} ({head['unit']}{', log scale' if xlog else ''}){' — estimated' if estimated else ''}  {better}"
    parts.append(
        f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 8}" class=axis text-anchor=middle>{html.escape(xlabel)}</text>'
    )
    parts.append(
        f'<text transform="translate(14,{(PAD_T + H - PAD_B) / 2}) rotate(-90)" class=axis text-anchor=middle>{html.escape(q)} (ppl, lower is better)</text>'
    )
    pts = sorted(((sx(fx["value"]), sy(fy["value"])) for v, fx, fy in rows if v["name"] in front))
    if len(pts) > 1:
        parts.append('<polyline class=front points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '" />')
    for v, fx, fy in rows:
        x, y = sx(fx["value"]), sy(fy["value"])
        cls = " ".join(
            c
            for c in (
                "pt",
                "onfront" if v["name"] in front else "dominated",
                "estimated" if fx["method"] == "estimated" else "",
                "baseline" if v["name"] == "baseline" else "",
            )
            if c
        )
        tip = f"{v['name']}: {q} {format_value(fy['value'])}, {metric} {format_value(fx['value'])} {fx['unit']} ({fx['method']})"
        if v.get("recipe"):
            tip += " | " + " → ".join(s["technique"] for s in v["recipe"]["stages"])
        if badge(v, metric, data):
            tip += " | no speed kernel: " + v["speed_kernel"]["text"]
        lx, anchor = (x + 8, "start") if x < W - 90 else (x - 8, "end")  # keep labels inside the plot
        parts.append(
            f'<g class="{cls}" data-tip="{html.escape(tip)}"><title>{html.escape(tip)}</title><circle cx="{x:.1f}" cy="{y:.1f}" r="6" /><text x="{lx:.1f}" y="{y - 8:.1f}" class=label text-anchor={anchor}>{html.escape(v["name"])}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def badge(variant: dict, metric: str, data: dict) -> str:
    """The "no speed kernel" badge beside a speed figure of a variant that ran dequantized ('' otherwise)."""
    note = variant.get("speed_kernel")
    if not note or metric not in data.get("speed_metrics", ()):
        return ""
    return f' <span class=nokernel title="{html.escape(note["text"])}">no speed kernel</span>'


def script_json(data: dict) -> str:
    """JSON safe inside <script>: <, > and & as JSON unicode escapes (still the same JSON), so a string can hold "</script>" or "<!--"."""
    text = json.dumps(data, default=str)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _fig(variant: dict, metric: str, data: dict) -> dict | None:
    key = f"{metric}@{data['workload']['name']}" if METRICS[metric].per_workload else metric
    return variant["figures"].get(key)


def bars_html(data: dict) -> str:
    """Per resource, each variant's headline figure relative to the baseline, as CSS bars."""
    out = []
    for resource, head in data["headline"].items():
        metric = head["metric"]
        base = _fig(data["variants"][0], metric, data)
        if not base or not base["value"]:
            continue
        rows = []
        for v in data["variants"][1:]:
            f = _fig(v, metric, data)
            if not f:
                continue
            ratio = f["value"] / base["value"]
            good = ratio >= 1 if head["higher_is_better"] else ratio <= 1
            kind = " tie" if f.get("tie") else (" good" if good else " bad")
            width = min(100.0, 50 * ratio)
            est = " estimated" if f["method"] == "estimated" else ""
            rows.append(
                f'<div class="bar-row"><span class=bar-name>{html.escape(v["name"])}</span><span class="bar{kind}{est}" style="width:{width:.1f}%"></span><span class=bar-val>{ratio:.2f}×{" ≈" if f.get("tie") else ""}{" (est.)" if est else ""}{badge(v, metric, data)}</span></div>'
            )
        out.append(
            f"<div class=bars><h3>{resource}: {metric} vs baseline <small>({'higher' if head['higher_is_better'] else 'lower'} is better; the middle line is the baseline; grey ≈: within the noise)</small></h3>{''.join(rows)}</div>"
        )
    return "".join(out)


def render_html(data: dict) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = lambda v: "" if v is None else format_value(v)
    env.filters["pretty"] = lambda v: json.dumps(
        v, indent=2, sort_keys=True, default=str, ensure_ascii=False
    )  # autoescaped where used: tojson would show \\u003c for <
    template = env.get_template("template.html")
    plots = {r: scatter_svg(data, r) for r in data["headline"]}
    metric_names = sorted(
        {f["metric"] for v in data["variants"] for f in v["figures"].values()},
        key=lambda m: (data["metrics"][m]["resource"], m),
    )
    return template.render(
        d=data, plots=plots, bars=bars_html(data), metric_names=metric_names, data_json=script_json(data)
    )
