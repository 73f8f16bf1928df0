"""Report layout: scatter labels that never overlap, tie lists summarised, optional notes rendered.

The data dicts here are built by hand (no store): each test states only what it looks at.
"""

import html
import itertools
import math
import re
import shutil

import markupsafe
import pytest

from frugalm.measure.metrics import METRICS
from frugalm.report.html import PAD_B, PAD_L, PAD_R, PAD_T, SAME_SPOT, H, R, W, label_box, render_html, scatter_svg
from frugalm.report.markdown import render_markdown

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<script>alert(1)</script> \"'</script><!-- a|b"


def _figure(metric: str, value: float, base: float, workload: str | None) -> dict:
    unit = METRICS[metric].unit
    return {"metric": metric, "workload": workload, "value": value, "unit": unit, "method": "measured", "n": 5} | {
        "spread": None,
        "margin": 0.0,
        "delta_pct": 100 * (value / base - 1),
        "tie": False,
    }


def report_data(points: list[tuple[str, float, float]], tied: list[str] = (), **extra) -> dict:
    """A report of (name, ppl_tok, decode_tok_s) points, the first the baseline; one constraint whose
    best computation variant is the fastest, with `tied` as its ties."""
    base_ppl, base_tok = points[0][1], points[0][2]
    front = [n for n, p, t in points if not any(p2 <= p and t2 >= t and (p2, t2) != (p, t) for _, p2, t2 in points)]
    variants = []
    for name, ppl, tok in points:
        figures = {
            "ppl_tok": _figure("ppl_tok", ppl, base_ppl, None),
            "decode_tok_s@chat": _figure("decode_tok_s", tok, base_tok, "chat"),
        }
        variants.append(
            {
                "name": name,
                "run_id": f"run-{name}",
                "figures": figures,
                "on_front": name in front,
                "fronts": ["computation"] if name in front else [],
                "recipe": None,
                "kernels": None,
                "speed_kernel": None,
                "changes": [],
                "produce_wall_s": None,
                "artifact": f"/out/{name}",
                "environment": {},
                "workload": "chat",
            }
        )
    fastest = max(points, key=lambda p: p[2])
    metrics = {
        n: {
            "unit": m.unit,
            "higher_is_better": m.higher_is_better,
            "resource": m.resource,
            "description": m.description,
        }
        for n, m in METRICS.items()
    }
    return {
        "session_id": "s-1",
        "model": "m",
        "created_at": "2026-12-01T00:00:00+0000",
        "benchmark_version": "frugalm-bench v2",
        "environment": {"device": "cpu", "cpu": "CPU", "torch": "2"},
        "workload": {"name": "chat", "prompt_tokens": 128, "output_tokens": 64, "batch_size": 1},
        "quality_metric": "ppl_tok",
        "headline": {"computation": {"metric": "decode_tok_s", **metrics["decode_tok_s"]}},
        "metrics": metrics,
        "speed_metrics": ["decode_tok_s"],
        "variants": variants,
        "skipped": {},
        "fronts": {"computation": front},
        "hypervolume": {"computation": 1.0},
        "recommendations": [
            {
                "constraint": "ppl_tok <= +5% of baseline",
                "bound": base_ppl * 1.05,
                "satisfied_by": [p[0] for p in points],
                "best": {
                    "computation": {
                        "variant": fastest[0],
                        "value": fastest[2],
                        "metric": "decode_tok_s",
                        "tied": list(tied),
                    }
                },
            }
        ],
        "noise": {"decode_tok_s@chat": 0.05},
        "out_dir": "/out",
        "protocol": {"data": {"data": "text.txt"}},
        **extra,
    }


def crowded(names: list[str] | None = None) -> list[tuple[str, float, float]]:
    """The baseline, 15 variants in a cluster of ~50x40px (one exactly on another) and three far away."""
    cluster = [(f"variant-{i:02d}", 74.0 + 0.12 * (i % 5), 200.0 + 20 * (i // 5) + 4 * (i % 3)) for i in range(14)]
    cluster.append(("twin-of-03", *cluster[3][1:]))
    far = [("wanda-2of4", 77.0, 420.0), ("magnitude50", 76.2, 300.0), ("structured25-lora", 75.2, 510.0)]
    points = [("baseline", 74.1, 570.0), *cluster, *far]
    return [(n, p, t) for (_, p, t), n in zip(points, names)] if names else points


_G = re.compile(
    r'<g class="([^"]*)" data-tip="([^"]*)"><title>([^<]*)</title><circle cx="([\d.]+)" cy="([\d.]+)" r="\d+" />'
    r"(?:<line class=leader[^>]*/>)?(?:<text x=\"([\d.]+)\" y=\"([\d.]+)\" class=label text-anchor=(\w+)>([^<]*)</text>)?</g>"
)


def _points(svg: str) -> list[dict]:
    """Each plotted point: its circle, its tip and title, and its label (text and estimated box) if it has one."""
    out = []
    for cls, tip, title, cx, cy, lx, ly, anchor, text in _G.findall(svg):
        label = html.unescape(text) if lx else None
        box = label_box(float(lx), float(ly), anchor, label) if lx else None
        out.append({"cls": cls, "tip": tip, "title": title, "xy": (float(cx), float(cy)), "label": label, "box": box})
    return out


def _assert_labels_apart(points: list[dict]) -> None:
    labelled = [p for p in points if p["box"]]
    for a, b in itertools.combinations(labelled, 2):
        (a0, a1, a2, a3), (b0, b1, b2, b3) = a["box"], b["box"]
        assert not (a0 < b2 and b0 < a2 and a1 < b3 and b1 < a3), f"labels {a['label']!r} and {b['label']!r} overlap"
    for p in labelled:
        x0, y0, x1, y1 = p["box"]
        assert PAD_L <= x0 and x1 <= W - PAD_R and PAD_T <= y0 and y1 <= H - PAD_B, f"{p['label']!r} leaves the plot"
        for q in points:
            if math.dist(p["xy"], q["xy"]) < SAME_SPOT:
                continue  # its own circle (or one at the very same spot, which shares the label)
            nx, ny = min(max(q["xy"][0], x0), x1), min(max(q["xy"][1], y0), y1)
            assert math.hypot(nx - q["xy"][0], ny - q["xy"][1]) >= R, f"label {p['label']!r} covers a circle"


def test_crowded_scatter_labels_never_overlap_and_the_front_is_labelled():
    data = report_data(crowded())
    svg, unlabelled = scatter_svg(data, "computation")
    points = _points(svg)
    assert len(points) == len(data["variants"])  # every point drawn, each with a hover tip and a <title>
    for p, v in zip(points, data["variants"]):
        assert p["title"].startswith(html.escape(v["name"]) + ":") and p["tip"] == p["title"]
    _assert_labels_apart(points)
    names = {v["name"]: p for p, v in zip(points, data["variants"])}
    for name in ["baseline", *data["fronts"]["computation"]]:
        assert names[name]["label"] and names[name]["label"].split(" +")[0] == name, f"{name} is not labelled"
    assert unlabelled == sum(1 for p in points if not p["label"]) > 0  # the cluster has no room for every name
    assert (
        "at the same spot: twin-of-03" in names["variant-03"]["tip"]
    )  # a hidden twin is named where the mouse can reach
    assert "unlabelled: hover for names" in render_html(data)


def test_a_spacious_scatter_labels_every_point():
    data = report_data([("baseline", 74.0, 200.0), ("int8", 75.0, 300.0), ("int4", 78.0, 400.0)])
    svg, unlabelled = scatter_svg(data, "computation")
    assert unlabelled == 0 and [p["label"] for p in _points(svg)] == ["baseline", "int8", "int4"]
    assert "unlabelled" not in render_html(data)


def test_many_ties_are_summarised_and_listed_in_full():
    tied = [f"tied-{i}" for i in range(9)]
    data = report_data([("baseline", 74.0, 200.0), ("int8", 74.1, 300.0)], tied=tied)
    page = render_html(data)
    details = re.search(r"<details class=ties><summary>≈ 9 others tie</summary>(.*?)</details>", page)
    assert details and all(n in details.group(1) for n in tied)
    md = render_markdown(data)
    line = next(x for x in md.splitlines() if x.startswith("- ppl_tok <= +5%"))
    assert "≈ 9 others tie (see Ties below)" in line and "tied-0" not in line
    ties = md[md.index("## Ties") :]
    assert "ppl_tok <= +5% of baseline, computation (best: int8): " + ", ".join(tied) in ties

    data["recommendations"][0]["best"]["computation"]["tied"] = ["tied-0", "tied-1"]  # two stay inline
    assert "(tied within noise: tied-0, tied-1)" in render_html(data) and "details class=ties" not in render_html(data)
    md = render_markdown(data)
    assert "tied within noise: tied-0, tied-1" in md and "## Ties" not in md


def test_optional_warnings_tie_rule_self_check_and_intervals_render():
    extra = {
        "warnings": [{"kind": "load", "text": "The machine was busy: speed figures are noisy."}],
        "tie_rule": "Speeds tie when their paired 95% interval contains 1.",
        "self_check": {
            "metric": "speedup_decode",
            "workload": "chat",
            "value": 1.004,
            "ci": [0.982, 1.020],
            "halfwidth": 0.019,
            "met_target": True,
        },
    }
    data = report_data([("baseline", 74.0, 200.0), ("int8", 74.1, 210.0), ("int4", 75.0, 190.0)], **extra)
    int8, int4 = (v["figures"]["decode_tok_s@chat"] for v in data["variants"][1:])
    int8.update(ci=[205.0, 215.0], verdict="tie")  # +5% by sign, a tie by its paired interval
    int4.update(ci=[185.0, 195.0], verdict="better")  # the verdict decides, whatever the sign says
    page, md = render_html(data), render_markdown(data)

    assert re.search(r"<div class=warnings role=alert>.*The machine was busy: speed figures are noisy.</li>", page)
    assert page.index("class=warnings") < page.index("Recommended variants")
    assert "> **Warning:** The machine was busy: speed figures are noisy." in md
    assert md.index("**Warning:**") < md.index("## Recommended variants")

    for text in (page, md):
        assert "Speeds tie when their paired 95% interval contains 1." in text
        assert "0.01% of its value" not in text  # the hard-coded rule gives way
        assert "Run-to-run noise" in text
        assert "1.004× [0.982, 1.020] (95% interval; it should contain 1)" in text
    assert "Timing check — baseline against itself: speedup_decode 1.004×" in page

    assert "210<small> [205, 215]</small>" in page and '; 95% interval [205, 215]"' in page  # the table cell
    assert '<small class="" title="within the noise: a tie">+5.0% ≈</small>' in page
    assert '<small class="better">-5.0%</small>' in page
    assert "bar tie" in page and "bar good" in page  # int8 grey, int4 green by their verdicts
    assert "| int8 ★ | 74.1 (+0.1%) | 210 [205, 215] (+5.0%, ≈) |" in md
    assert "| int4 | 75 (+1.4%) | 190 [185, 195] (-5.0%) |" in md
    assert "int8** (210 [205, 215] tok/s" in md  # the recommendation's interval
    assert '210<small title="95% interval"> [205, 215]</small> tok/s' in page

    bare = report_data([("baseline", 74.0, 200.0), ("int8", 74.1, 210.0)])
    page, md = render_html(bare), render_markdown(bare)
    assert "class=warnings" not in page and "Warning" not in md and "Timing check" not in page + md
    assert "0.01% of its value" in page and "0.01% of its value" in md


def test_hostile_names_stay_escaped_in_labels_tips_and_ties():
    names = [n if n != "variant-05" else HOSTILE for n, _, _ in crowded()]
    names[-1] = "<i>far</i>&"  # far from the cluster, and short: it gets a label
    data = report_data(crowded(names), tied=[HOSTILE, *(f"t{i}" for i in range(4))])
    page, md = render_html(data), render_markdown(data)
    assert "<script>alert" not in page and "</script><!--" not in page
    escaped = html.escape(HOSTILE)  # in the SVG; jinja writes quotes as &#34; and &#39;
    assert re.search(r"class=label text-anchor=\w+>&lt;i&gt;far&lt;/i&gt;&amp;</text>", page)
    assert f"<title>{escaped}:" in page and f"</summary>within noise: {markupsafe.escape(HOSTILE)}, t0" in page
    assert "<script" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    ties = md[md.index("## Ties") :]
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \"'&lt;/script&gt;&lt;!-- a\\|b, t0" in ties


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_real_label_boxes_do_not_overlap_in_headless_chromium(tmp_path):
    """The browser's own text boxes (not our estimates) of the crowded plot: apart, clear of circles, inside."""
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(render_html(report_data(crowded())))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        page = browser.new_page()
        page.goto(path.as_uri())
        labels = page.evaluate(
            """() => Array.from(document.querySelectorAll('svg.plot text.label')).map(t => {
                const b = t.getBBox(), c = t.parentNode.querySelector('circle');
                return {text: t.textContent, box: [b.x, b.y, b.x + b.width, b.y + b.height],
                        own: [c.cx.baseVal.value, c.cy.baseVal.value]}; })"""
        )
        circles = page.evaluate(
            "() => Array.from(document.querySelectorAll('svg.plot circle')).map(c => [c.cx.baseVal.value, c.cy.baseVal.value])"
        )
        browser.close()
    assert len(labels) > 5
    for a, b in itertools.combinations(labels, 2):
        (a0, a1, a2, a3), (b0, b1, b2, b3) = a["box"], b["box"]
        assert not (a0 < b2 and b0 < a2 and a1 < b3 and b1 < a3), f"{a['text']!r} and {b['text']!r} overlap"
    for label in labels:
        x0, y0, x1, y1 = label["box"]
        assert PAD_L <= x0 and x1 <= W - PAD_R and PAD_T <= y0 and y1 <= H - PAD_B
        for cx, cy in circles:
            if math.dist((cx, cy), label["own"]) >= SAME_SPOT:
                nx, ny = min(max(cx, x0), x1), min(max(cy, y0), y1)
                assert math.hypot(nx - cx, ny - cy) >= R, f"{label['text']!r} covers a circle"
