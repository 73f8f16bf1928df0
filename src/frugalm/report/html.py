"""The HTML report: one self-contained file (inline CSS, SVG and a few lines of JS; no network).

Plots are SVG drawn here, so the file opens anywhere offline. Each point carries its recipe and
figures in a `data-tip` attribute shown on hover (and in an SVG <title> for browsers without
scripts). Labels are placed so that none overlaps another label or point (place_labels): the baseline
and the front first, the rest while room lasts; a point left without one keeps its name in its tip.
Estimated figures are drawn hollow and dashed and labelled "estimated". The speed
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


def _scale(values: list[float], lo_px: float, hi_px: float, log: bool, log_above: float = 20):
    """A linear or (when `log` and the values span more than `log_above` times) log10 pixel scale."""
    lo, hi = min(values), max(values)
    if log and lo > 0 and hi / lo > log_above:
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
    if log:  # 1, 2 and 5 per decade over a few decades, powers of ten beyond
        steps = (1, 2, 5) if hi - lo <= 3 else (1,)
        ticks = [m * 10**e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in steps]
        return [t for t in ticks if lo <= math.log10(t) <= hi]
    step = 10 ** math.floor(math.log10((hi - lo) / 4)) if hi > lo else 1
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


R, SAME_SPOT = 6, 2.0
"""Radius of a plotted point, and the distance within which points share one label ("name +2") (px)."""
LABEL_H, LABEL_ASCENT = 11.5, 8.5
"""Estimated label box height for the 10px label font, and how far its top sits above the baseline."""
_NARROW, _WIDE = set("fijlrtI-.,:;/'|!()[] "), set("mwMW%@")


def _char_width(c: str) -> float:
    if c in _NARROW:
        return 4.2
    if c in _WIDE or ord(c) >= 0x1100:  # East Asian scripts: a full em
        return 10.0
    return 8.5 if c.isupper() or not c.isalnum() else 6.4


def text_width(text: str) -> float:
    """An upper estimate (px) of `text` in the 10px label font.

    Per character: DejaVu Sans's widths rounded up (the widest of the common sans fonts, and
    Chromium's usual system-ui on Linux), so the real text fits the box in Helvetica or Segoe too.
    A flat 6px a character would be too narrow for "wanda50" or "mmm".
    """
    return sum(_char_width(c) for c in text)


def label_box(x: float, y: float, anchor: str, text: str) -> tuple[float, float, float, float]:
    """The estimated box (x0, y0, x1, y1) of a label drawn at x, y (its baseline) with this text-anchor."""
    w = text_width(text) + 1
    x0 = {"start": x, "middle": x - w / 2, "end": x - w}[anchor]
    return x0, y - LABEL_ASCENT, x0 + w, y - LABEL_ASCENT + LABEL_H


def _label_spots(x: float, y: float, far: bool):
    """Where a point's label may go, nearest first: (text x, baseline y, text-anchor, with a leader line?).

    Beside the point: right, left, above, below, then the diagonals. With `far`, then farther up or
    down (and out to the sides), joined to the point by a thin leader line. The text is anchored on
    its side nearest the point, so a real text narrower than its estimate still sits against it.
    """
    gap, d = R + 3, R - 1  # side labels clear the circle by 3px; a diagonal's corner by ~1px
    mid = y + LABEL_ASCENT - LABEL_H / 2  # the baseline that centres the box on the point
    yield x + gap, mid, "start", False
    yield x - gap, mid, "end", False
    yield x, y - gap - LABEL_H + LABEL_ASCENT, "middle", False
    yield x, y + gap + LABEL_ASCENT, "middle", False
    yield x + d, y - d - LABEL_H + LABEL_ASCENT, "start", False
    yield x - d, y - d - LABEL_H + LABEL_ASCENT, "end", False
    yield x + d, y + d + LABEL_ASCENT, "start", False
    yield x - d, y + d + LABEL_ASCENT, "end", False
    if far:
        ups = [(x, "middle"), (x - 4, "start"), (x + 4, "end"), (x + 16, "start"), (x - 16, "end")]
        ups += [(x + 36, "start"), (x - 36, "end")]
        for step in range(1, 6):
            dy = gap + step * LABEL_H
            for ly in (y - dy - LABEL_H + LABEL_ASCENT, y + dy + LABEL_ASCENT):  # up, then down
                for lx, anchor in ups:
                    yield lx, ly, anchor, True
        for dx in (24, 48):
            yield x + dx, mid, "start", True
            yield x - dx, mid, "end", True


def _hits_circle(box, cx: float, cy: float) -> bool:
    nx, ny = min(max(cx, box[0]), box[2]), min(max(cy, box[1]), box[3])  # the box's point nearest the centre
    return (nx - cx) ** 2 + (ny - cy) ** 2 < (R + 0.5) ** 2


def _leader(x: float, y: float, box) -> tuple[float, float, float, float]:
    """A line from the circle's edge to the box's nearest point (1px short of it)."""
    nx, ny = min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3])
    dist = math.hypot(nx - x, ny - y)
    ux, uy = (nx - x) / dist, (ny - y) / dist
    return x + ux * R, y + uy * R, nx - ux, ny - uy


def _inside(px: float, py: float, box) -> bool:
    return box[0] <= px <= box[2] and box[1] <= py <= box[3]


def place_labels(circles: list[tuple[float, float]], wanted: list[tuple[int, str, bool]]) -> dict[int, tuple]:
    """Greedy label placement: circle index -> (x, y, anchor, leader line or None) for the labels that fit.

    `wanted` holds (circle index, text, may sit far), the most important first; each label takes the
    first spot (see _label_spots) whose box stays inside the plot area and overlaps no label or
    leader line placed before it and no other circle (circles at its own spot aside). A leader line
    may cross no circle or label. A label with no free spot is left out: the name stays in the
    point's hover tip.
    """
    placed: dict[int, tuple] = {}
    boxes: list[tuple] = []
    dots: list[tuple[float, float]] = []  # points along the leader lines, every 2px
    for i, text, far in wanted:
        x, y = circles[i]
        others = [(px, py) for px, py in circles if math.hypot(px - x, py - y) >= SAME_SPOT]
        for lx, ly, anchor, lead in _label_spots(x, y, far):
            box = label_box(lx, ly, anchor, text)
            if box[0] < PAD_L or box[2] > W - PAD_R or box[1] < PAD_T or box[3] > H - PAD_B:
                continue
            if any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes):
                continue
            if any(_hits_circle(box, px, py) for px, py in others) or any(_inside(*dot, box) for dot in dots):
                continue
            line = _leader(x, y, box) if lead else None
            if line:
                n = max(1, int(math.hypot(line[2] - line[0], line[3] - line[1]) / 2))
                line_dots = [
                    (line[0] + (line[2] - line[0]) * k / n, line[1] + (line[3] - line[1]) * k / n) for k in range(n + 1)
                ]
                # the line's first dot sits on its own circle's edge, where a neighbour may touch
                if any(_inside(*dot, b) for dot in line_dots for b in boxes) or any(
                    (dx - px) ** 2 + (dy - py) ** 2 < R**2 for dx, dy in line_dots[1:] for px, py in others
                ):
                    continue
                dots += line_dots
            placed[i] = (lx, ly, anchor, line)
            boxes.append(box)
            break
    return placed


def scatter_svg(data: dict, resource: str) -> tuple[str, int]:
    """Quality (y) against one resource's headline metric (x), front points filled and joined.

    Returns the SVG and how many points went unlabelled (no room beside them: see place_labels).
    """
    head = data["headline"][resource]
    metric, q = head["metric"], data["quality_metric"]
    rows = []
    for v in data["variants"]:
        fx, fy = _fig(v, metric, data), _fig(v, q, data)
        if fx and fy:
            rows.append((v, fx, fy))
    if len(rows) < 1:
        return "<p class=muted>no figures for this resource</p>", 0
    sx, (xlo, xhi, xlog) = _scale([fx["value"] for _, fx, _ in rows], PAD_L, W - PAD_R, log=True)
    # Perplexity on a log axis (the loss) once one variant's is three times another's, so a broken
    # variant does not squash every other point onto the axis.
    sy, (ylo, yhi, ylog) = _scale([fy["value"] for _, _, fy in rows], H - PAD_B, PAD_T, log=True, log_above=3)
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
        f'<text transform="translate(14,{(PAD_T + H - PAD_B) / 2}) rotate(-90)" class=axis text-anchor=middle>{html.escape(q)} (ppl{", log scale" if ylog else ""}, lower is better)</text>'
    )
    pts = sorted(((sx(fx["value"]), sy(fy["value"])) for v, fx, fy in rows if v["name"] in front))
    if len(pts) > 1:
        parts.append('<polyline class=front points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '" />')
    xy = [(round(sx(fx["value"]), 1), round(sy(fy["value"]), 1), v["name"]) for v, fx, fy in rows]
    # Labels: the baseline first, then the front (these may sit farther off, on a leader line), then
    # the rest beside their points while room lasts (sorted is stable). Points at one spot share a
    # label, "first name +k"; their tips name each other.
    order = sorted(range(len(rows)), key=lambda i: (xy[i][2] != "baseline", xy[i][2] not in front))
    wanted: list[list] = []  # [index, name, may sit far, points sharing its spot]
    for i in order:
        x, y, name = xy[i]
        same = next((w for w in wanted if math.hypot(xy[w[0]][0] - x, xy[w[0]][1] - y) < SAME_SPOT), None)
        if same:
            same[3] += 1
        else:
            wanted.append([i, name, name == "baseline" or name in front, 0])
    texts = {i: name + (f" +{k}" if k else "") for i, name, _, k in wanted}
    labels = place_labels([(x, y) for x, y, _ in xy], [(i, texts[i], far) for i, _, far, _ in wanted])
    for i, (v, fx, fy) in enumerate(rows):
        x, y, _ = xy[i]
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
        # A circle drawn over this one's centre hides it from the mouse: name those in every tip there.
        hidden = [n for j, (px, py, n) in enumerate(xy) if j != i and (px - x) ** 2 + (py - y) ** 2 < R**2]
        if hidden:
            tip += " | at the same spot: " + ", ".join(hidden)
        label = ""
        if i in labels:
            lx, ly, anchor, line = labels[i]
            if line:
                label = '<line class=leader x1="{:.1f}" y1="{:.1f}" x2="{:.1f}" y2="{:.1f}" />'.format(*line)
            label += f'<text x="{lx:.1f}" y="{ly:.1f}" class=label text-anchor={anchor}>{html.escape(texts[i])}</text>'
        parts.append(
            f'<g class="{cls}" data-tip="{html.escape(tip)}"><title>{html.escape(tip)}</title><circle cx="{x:.1f}" cy="{y:.1f}" r="{R}" />{label}</g>'
        )
    parts.append("</svg>")
    return "".join(parts), len(rows) - len(labels)


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


def verdict(f: dict, higher_is_better: bool) -> str:
    """A figure against the baseline's: "better", "worse", "tie" (within the noise) or "" (the same value).

    The report data's own "verdict" (from a paired interval) decides where present; otherwise its
    "tie" flag (within the margins), then the sign of its Δ.
    """
    if f.get("verdict"):
        return f["verdict"]
    if f.get("tie"):
        return "tie"
    if not f.get("delta_pct"):
        return ""
    return "better" if (f["delta_pct"] > 0) == higher_is_better else "worse"


def delta_text(f: dict) -> str:
    """A figure's change against the baseline: in points with the paired interval for a task
    accuracy scored on the same items, else in percent."""
    if f.get("paired"):
        lo, hi = (100 * x for x in f["paired"]["ci"])
        return f"Δ {100 * f['paired']['delta']:+.1f} pts [{lo:+.1f}, {hi:+.1f}]"
    return f"{f['delta_pct']:+.1f}%"


def ci_text(f: dict) -> str:
    """ " [lo, hi]" for a figure with a 95% interval ('' otherwise)."""
    return f" [{format_value(f['ci'][0])}, {format_value(f['ci'][1])}]" if f.get("ci") else ""


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
            seen = verdict(f, head["higher_is_better"])
            kind = {"better": " good", "worse": " bad", "tie": " tie"}.get(seen, " good" if good else " bad")
            width = min(100.0, 50 * ratio)
            est = " estimated" if f["method"] == "estimated" else ""
            rows.append(
                f'<div class="bar-row"><span class=bar-name>{html.escape(v["name"])}</span><span class="bar{kind}{est}" style="width:{width:.1f}%"></span><span class=bar-val>{ratio:.2f}×{" ≈" if seen == "tie" else ""}{" (est.)" if est else ""}{badge(v, metric, data)}</span></div>'
            )
        out.append(
            f"<div class=bars><h3>{resource}: {metric} vs baseline <small>({'higher' if head['higher_is_better'] else 'lower'} is better; the middle line is the baseline; grey ≈: within the noise)</small></h3>{''.join(rows)}</div>"
        )
    return "".join(out)


def hypervolume_svg(curve: list[dict], width: int = 560, height: int = 180) -> str:
    """Hypervolume of the trials so far against trial number: a step line, portfolio trials in amber."""
    if not curve:
        return ""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 10, 28
    top = max(c["hypervolume"] for c in curve) or 1.0
    n = max(len(curve) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad_l + i * (width - pad_l - pad_r) / n, height - pad_b - v / top * (height - pad_t - pad_b)

    path = " ".join(f"{x:.1f},{y:.1f}" for i, c in enumerate(curve) for x, y in [xy(i, c["hypervolume"])])
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{"#b45309" if c["source"] == "portfolio" else "#1d4ed8"}">'
        f"<title>trial {c['trial']} ({c['source']}): {format_value(c['hypervolume'])}</title></circle>"
        for i, c in enumerate(curve)
        for x, y in [xy(i, c["hypervolume"])]
    )
    axis = (
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#94a3b8"/>'
        f'<text x="{pad_l - 6}" y="{pad_t + 8}" text-anchor="end" font-size="11">{format_value(top)}</text>'
        f'<text x="{pad_l - 6}" y="{height - pad_b}" text-anchor="end" font-size="11">0</text>'
        f'<text x="{(width + pad_l) / 2}" y="{height - 6}" text-anchor="middle" font-size="11">trial</text>'
    )
    return (
        f'<svg class=hvcurve width="{width}" height="{height}" role="img" aria-label="hypervolume by trial">{axis}'
        f'<polyline points="{path}" fill="none" stroke="#1d4ed8" stroke-width="1.5"/>{dots}</svg>'
    )


def render_html(data: dict) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = lambda v: "" if v is None else format_value(v)
    env.filters["pretty"] = lambda v: json.dumps(
        v, indent=2, sort_keys=True, default=str, ensure_ascii=False
    )  # autoescaped where used: tojson would show \\u003c for <
    template = env.get_template("template.html")
    plots = {r: scatter_svg(data, r) for r in data["headline"]}  # resource -> (svg, unlabelled points)
    metric_names = sorted(
        {f["metric"] for v in data["variants"] for f in v["figures"].values()},
        key=lambda m: (data["metrics"][m]["resource"], m),
    )
    return template.render(
        d=data,
        plots=plots,
        bars=bars_html(data),
        metric_names=metric_names,
        data_json=script_json(data),
        hv_svg=hypervolume_svg((data.get("search") or {}).get("hypervolume", [])),
        verdict=verdict,
        delta_text=delta_text,
        ci_text=ci_text,
        figure=lambda variant, metric: _fig(variant, metric, data),
    )
