"""The Markdown summary: recommendations, fronts, and the headline figures of every variant.

Names, paths and reasons come from users (recipe names, model paths): `text()` escapes them, so
they render as text: HTML special characters as entities (no raw tag or comment survives),
Markdown punctuation and table pipes with a backslash (a name cannot split a table cell).
"""

from __future__ import annotations

import re

from frugalm.measure.metrics import METRICS
from frugalm.report.scorecard import format_value
from frugalm.report.utility import TASK_METRICS

_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|~])")


def text(value) -> str:
    """`value` as Markdown that renders as exactly its text, on one line (safe in a table cell)."""
    s = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(s.splitlines()))


def _no_speed_kernel(variant: dict, metric: str, d: dict) -> bool:
    return bool(variant.get("speed_kernel")) and metric in d.get("speed_metrics", ())


def _cell(variant: dict, metric: str, d: dict) -> str:
    f = variant["figures"].get(_key(metric, d))
    if not f:
        return "—"
    out = format_value(f["value"])
    if f.get("ci"):
        out += f" [{format_value(f['ci'][0])}, {format_value(f['ci'][1])}]"
    if f.get("paired") and variant["name"] != "baseline":
        lo, hi = (100 * x for x in f["paired"]["ci"])
        tie = ", ≈" if f.get("verdict") == "tie" else ""
        out += f" (Δ {100 * f['paired']['delta']:+.1f} pts [{lo:+.1f}, {hi:+.1f}] paired{tie})"
    elif f.get("delta_pct") is not None and variant["name"] != "baseline":
        tie = f["verdict"] == "tie" if f.get("verdict") else f.get("tie")  # a paired verdict decides where present
        out += f" ({f['delta_pct']:+.1f}%{', ≈' if tie else ''})"
    out += " *est.*" if f["method"] == "estimated" else ""
    return out + (" *(no speed kernel)*" if _no_speed_kernel(variant, metric, d) else "")


TIES_INLINE = 2
"""At most this many tied names inline in a recommendation; more are counted there and listed under "Ties"."""


def _best(res: str, b: dict, d: dict) -> str:
    variant = next((v for v in d["variants"] if v["name"] == b["variant"]), {})
    tied = b.get("tied") or []
    if len(tied) > TIES_INLINE:
        ties = f"; ≈ {len(tied)} others tie (see Ties below)"
    else:
        ties = "; tied within noise: " + ", ".join(text(n) for n in tied) if tied else ""
    slow = "; no speed kernel" if _no_speed_kernel(variant, b["metric"], d) else ""
    f = variant.get("figures", {}).get(_key(b["metric"], d))
    ci = f" [{format_value(f['ci'][0])}, {format_value(f['ci'][1])}]" if f and f.get("ci") else ""
    return f"{res}: **{text(b['variant'])}** ({format_value(b['value'])}{ci} {METRICS[b['metric']].unit}{ties}{slow})"


def _key(metric: str, d: dict) -> str:
    return f"{metric}@{d['workload']['name']}" if METRICS[metric].per_workload else metric


def render_markdown(d: dict) -> str:
    metrics = [d["quality_metric"], *[h["metric"] for h in d["headline"].values()]]
    lines = [
        f"# frugalm report — {text(d['model'])}",
        "",
        f"{text(d['benchmark_version'])} · session {text(d['session_id'])} · {d['created_at']} · {text(d['environment'].get('device'))} · {text(d['environment'].get('cpu'))}",
        f"Workload `{d['workload']['name']}`; quality `{d['quality_metric']}` on {text(d['protocol']['data']['data'])}. *est.* marks estimated figures (profile prices, power model).",
        "",
    ]
    for w in d.get("warnings") or []:  # a blank line between them keeps each its own quote
        lines += [f"> **Warning:** {text(w['text'])}", ""]
    lines += ["## Recommended variants", ""]
    for r in d["recommendations"]:
        best = ", ".join(_best(res, b, d) for res, b in r["best"].items())
        lines.append(f"- {r['constraint']}: {best or 'no variant satisfies it'}")
    lines += ["", "## Pareto fronts (quality against each resource)", ""]
    noise = ", ".join(f"`{k}` ±{100 * v:.1f}%" for k, v in d.get("noise", {}).items() if k.split("@")[0] in metrics)
    noise = f"Run-to-run noise (baseline measured first and last): {noise or 'none measured'}."
    if d.get("tie_rule"):
        lines += [text(d["tie_rule"]), "", noise, ""]
    else:
        lines += [
            f"{noise} Differences within a figure's margin (its spread, this noise or 0.01% of its value, whichever is largest) are ties, marked ≈; a variant is off a front only if another beats it beyond the margins.",
            "",
        ]
    if d.get("self_check"):
        lines += [_self_check(d["self_check"]), ""]
    for res, names in d["fronts"].items():
        lines.append(
            f"- {res} (`{d['headline'][res]['metric']}`): {', '.join(text(n) for n in names)}; hypervolume {format_value(d['hypervolume'].get(res, 0))}"
        )
    lines += ["", "## Headline figures (Δ to baseline)", ""]
    header = ["variant", *[f"{m} ({METRICS[m].unit})" for m in metrics]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in d["variants"]:
        name = text(v["name"]) + (" ★" if v["on_front"] else "")
        lines.append("| " + " | ".join([name, *[_cell(v, m, d) for m in metrics]]) + " |")
    lines += _task_lines(d)
    lines += utility_lines(d.get("utility"))
    lines += _kernel_lines(d)
    if d["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {text(n)}: {text(why)}" for n, why in d["skipped"].items()]
    lines += _ties_lines(d)
    lines += search_lines(d.get("search"))
    lines += ["", f"Artifacts of variants on a front: {text(d['out_dir'])}/variants/. ★ = on at least one front.", ""]
    return "\n".join(lines)


def _task_lines(d: dict) -> list[str]:
    """Task accuracies, with each variant's paired difference to the baseline on the same items."""
    tasks = [m for m in TASK_METRICS if any(m in v["figures"] for v in d["variants"])]
    if not tasks:
        return []
    out = ["", "## Tasks (accuracy; Δ in points against the baseline on the same items, paired 95% interval)", ""]
    out += ["| variant | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    return out + ["| " + " | ".join([text(v["name"]), *[_cell(v, m, d) for m in tasks]]) + " |" for v in d["variants"]]


def utility_lines(u: dict | None) -> list[str]:
    """The utility ranking with its rates, best first."""
    if not u:
        return []
    rates = ", ".join(f"{r} {format_value(x)}" for r, x in u["rates"].items())
    resources = list(u["resources"])
    out = ["", "## Utility ranking", "",
           f"{text(u['formula'])}. Rates (points per halving; `--utility RESOURCE=POINTS` changes them): {rates}. "
           f"Q: {text(u['quality'])}. Resources: " + ", ".join(f"{r} `{m}`" for r, m in u["resources"].items()) + ".",
           "", "| rank | variant | utility | Q | " + " | ".join(resources) + " |",
           "|" + "---|" * (len(resources) + 4)]  # fmt: skip
    for i, row in enumerate(u["ranking"], 1):
        parts = [f"{row['parts'][r]:+.2f}" if r in row["parts"] else "—" for r in resources]
        out.append(
            f"| {i} | {text(row['variant'])} | {row['utility']:.2f} | {row['quality']:.2f} | "
            + " | ".join(parts)
            + " |"
        )
    return out


def _kernel_lines(d: dict) -> list[str]:
    """Each variant's kernels, quantized formats named, and the "no speed kernel" notes."""
    rows = [
        f"- {text(v['name'])}: {text(v['kernels'])}"
        + (f". **{text(v['speed_kernel']['text'])}.**" if v.get("speed_kernel") else "")
        for v in d["variants"]
        if v.get("kernels")
    ]
    out = ["", "## Kernels (linear layers, by format)", "", *rows] if rows else []
    decoding = [f"- {text(v['name'])}: {text(v['decoding'])}" for v in d["variants"] if v.get("decoding")]
    return out + (["", "## Decoding strategies (batch 1, evaluation-text prompts)", "", *decoding] if decoding else [])


def _self_check(sc: dict) -> str:
    """The baseline timed against itself: its speedup's interval should contain 1."""
    lo, hi = sc["ci"]
    out = f"Timing check — baseline against itself: `{sc['metric']}` {sc['value']:.3f}× [{lo:.3f}, {hi:.3f}] (95% interval; it should contain 1)"
    if not lo <= 1 <= hi:
        out += " — **it does not: speed differences this small are not to be trusted here**"
    if sc.get("met_target") is False:
        out += " (wider than its target)"
    return out + (f" on `{sc['workload']}`." if sc.get("workload") else ".")


def _ties_lines(d: dict) -> list[str]:
    """The full lists of tied variants too long to show inline in the recommendations."""
    rows = [
        f"- {r['constraint']}, {res} (best: {text(b['variant'])}): {', '.join(text(n) for n in b['tied'])}"
        for r in d["recommendations"]
        for res, b in r["best"].items()
        if len(b.get("tied") or []) > TIES_INLINE
    ]
    return ["", "## Ties", "", "Variants tied within noise with the recommended one:", "", *rows] if rows else []


def search_lines(s: dict | None) -> list[str]:
    """The search: its settings, its front over trials, hypervolume by trial, the settings that mattered, every trial."""
    if not s:
        return []
    objectives = s["objectives"]
    warm = sum(t["source"] == "portfolio" for t in s["trials"])
    lines = [
        "",
        "## Search",
        "",
        f"Space `{text(s['space'])}`, sampler {s['sampler']} (seed {s['seed']}); objectives {', '.join(f'`{o}`' for o in objectives)}; "
        f"constraints: {'; '.join(s['constraints']) or 'none'}. {s['measured']} variant(s) proposed and measured by the search, "
        f"after {warm} portfolio variant(s) given as its warm start. Hypervolume reference: "
        + ", ".join(f"`{o}` {format_value(v)}" for o, v in s["reference"].items())
        + " (the baseline's figures made 50% worse).",
        "",
        f"Front over all trials (every objective at once): {', '.join(text(n) for n in s['front']) or 'none'}.",
        "",
    ]
    curve = s["hypervolume"]
    if curve:
        steps = [c for i, c in enumerate(curve) if i == 0 or c["hypervolume"] != curve[i - 1]["hypervolume"]]
        lines.append(
            "Hypervolume by trial: "
            + ", ".join(f"{format_value(c['hypervolume'])} (trial {c['trial']})" for c in steps)
            + "."
        )
    for objective, found in (s.get("importances") or {}).items():
        top = sorted(found.items(), key=lambda kv: -kv[1])[:5]
        lines.append(
            f"Settings that mattered for `{objective}` (PED-ANOVA importance): "
            + ", ".join(f"`{k}` {v:.2f}" for k, v in top)
            + "."
        )
    lines += [
        "",
        "| trial | source | state | settings | " + " | ".join(objectives) + " |",
        "|" + "---|" * (4 + len(objectives)),
    ]
    for t in s["trials"]:
        shown = t["figures"] if t["state"] == "complete" else {}  # a pruned trial's figures are its screen's
        values = [format_value(shown[o]) if o in shown else "—" for o in objectives]
        state = (
            t["state"] + (" (repeat)" if t.get("repeat") else "") + (f": {text(t['reason'])}" if t["reason"] else "")
        )
        what = text(t.get("settings") or t["name"]) + (f" = {text(t['name'])}" if t["name"] else "")
        lines.append(f"| {t['number']} | {t['source']} | {state} | {what} | " + " | ".join(values) + " |")
    return lines
