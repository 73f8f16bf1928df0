"""A Dynaboard-style utility: every variant ranked by quality minus its resources at stated exchange rates.

Dynaboard (Ma et al. 2021) ranks models by one score that weighs quality against resources with
rates the user sets (its "marginal rates of substitution"). Here:

    utility = Q - sum over resources of rate[r] * log2(resource[r] / baseline's resource[r])

in points of quality. Q is the mean task accuracy in percentage points (acc_cloze, acc_choice,
acc_code: those the baseline has); a report without tasks uses perplexity instead,
Q = -rate["quality"] * log2(ppl_tok / baseline's ppl_tok). A rate is the points of quality one
would give for halving that resource: with computation=2, a variant twice as fast as the baseline
gains 2 points, one twice as slow loses 2. Each resource is its report headline: time per token
(1 / the paired decode speedup where there is one), peak memory, energy and money per token (the
paired ratios where there are), and the compressed artifact shipped. A figure missing for a
variant counts 0 and is named. Point estimates: the intervals of the figures are not propagated.
"""

from __future__ import annotations

import math

from frugalm.errors import ConfigError, suggest

DEFAULT_RATES = {"quality": 10.0, "computation": 2.0, "memory": 2.0, "energy": 1.0, "money": 1.0, "network": 0.5}
"""Points of quality per halving of each resource; "quality": points per halving of perplexity (used only without tasks)."""
TASK_METRICS = ("acc_cloze", "acc_choice", "acc_code")
RATIO_METRICS = {"speedup_decode": True, "energy_ratio_decode": False, "cost_ratio_decode": False}
"""Paired headlines and whether the figure is baseline/variant (a speedup) rather than variant/baseline."""


def parse_rates(specs: list[str] | tuple[str, ...]) -> dict[str, float]:
    """DEFAULT_RATES with RESOURCE=POINTS overrides (`computation=5`); one line of error for a bad one."""
    rates = dict(DEFAULT_RATES)
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or name not in rates:
            raise ConfigError(
                f"utility rate '{spec}': expected RESOURCE=POINTS with RESOURCE one of {', '.join(rates)}{suggest(name, rates)}"
            )
        try:
            rates[name] = float(value)
        except ValueError:
            raise ConfigError(f"utility rate '{spec}': {value!r} is not a number of points, e.g. {name}=2") from None
        if not math.isfinite(rates[name]) or rates[name] < 0:
            raise ConfigError(f"utility rate '{spec}': give a finite rate >= 0 (points per halving)")
    return rates


def _ratio(figures: dict, base: dict, metric: str, workload: str) -> float | None:
    """The variant's resource over the baseline's (lower is better), from the headline figure."""
    key = f"{metric}@{workload}" if f"{metric}@{workload}" in figures or f"{metric}@{workload}" in base else metric
    f, b = figures.get(key), base.get(key)
    if metric in RATIO_METRICS:
        if f is None or not f["value"] > 0:
            return None
        return 1 / f["value"] if RATIO_METRICS[metric] else f["value"]
    if f is None or b is None or not (f["value"] > 0 and b["value"] > 0):
        return None
    ratio = f["value"] / b["value"]
    return 1 / ratio if metric == "decode_tok_s" else ratio  # a rate: time per token is its inverse


def utility_ranking(variants: list[dict], headline: dict[str, str], workload: str, rates: dict[str, float]) -> dict:
    """The ranking (best first) of report variants (baseline first; their figures as build_report_data
    makes them), each with its utility and its parts; `headline`: resource -> metric."""
    base = variants[0]["figures"]
    tasks = [m for m in TASK_METRICS if m in base]
    rows = []
    for v in variants:
        figs = v["figures"]
        missing = []
        if tasks:
            accs = [figs[m]["value"] for m in tasks if m in figs]
            missing += [m for m in tasks if m not in figs]
            quality = 100 * sum(accs) / len(accs) if accs else 0.0
        else:
            r = _ratio(figs, base, "ppl_tok", workload)
            quality = -rates["quality"] * math.log2(r) if r else 0.0
            missing += [] if r else ["ppl_tok"]
        parts = {}
        for resource, metric in headline.items():
            if resource not in rates:  # "weights": memory's second headline, not a resource of its own
                continue
            r = _ratio(figs, base, metric, workload)
            if r is None:
                missing.append(metric)
                continue
            parts[resource] = 0.0 - rates[resource] * math.log2(r)  # 0.0 - : no "-0.00"
        rows.append({"variant": v["name"], "utility": quality + sum(parts.values()), "quality": quality,
                     "parts": parts, "missing": missing})  # fmt: skip
    rows.sort(key=lambda r: -r["utility"])
    return {
        "rates": rates,
        "quality": f"mean task accuracy, points ({', '.join(tasks)})"
        if tasks
        else f"-{rates['quality']:g} points per doubling of ppl_tok (no task figures)",
        "formula": "utility = Q - sum_r rate_r * log2(resource_r / baseline's); rates in points per halving",
        "resources": {r: m for r, m in headline.items() if r in rates},
        "ranking": rows,
    }
