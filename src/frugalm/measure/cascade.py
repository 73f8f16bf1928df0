"""A cascade's accuracy against its cost at every threshold, from one pass of each model over the items.

With the small model's answer, confidence and cost per item and the large model's answer and cost,
escalating the items whose confidence is below tau gives, for every tau at once (items sorted by
confidence): accuracy = mean of (large's score if escalated else small's), and cost = every item's
small-model cost + the escalated items' large-model cost, as a ratio to the large model alone. The
cost is FLOPs counted with torch's counter as the models ran (measure/tasks.py); time, energy and
money scale with it on a compute-bound device and are not measured per threshold here.

The threshold a cascade ships with is chosen on items other than those it is evaluated on (the
cascade stage uses the training part of the text), and the figure stored is the shipped threshold's
accuracy on the evaluated items, paired against the reference like every task figure.
"""

from __future__ import annotations

from collections.abc import Callable

from frugalm.runtime.cascade import CONFIDENCES

TIMING = (
    "per model, two passes over the items, alternating small, large, small, large; an item's time is its "
    "minimum over the two passes (each batch's forward time shared among its items by unpadded tokens)"
)
ESCALATE_ALL = 1.0 + 1e-9
"""A threshold above every confidence (all in [0, 1]): every item goes to the large model."""


def time_items(models: list, scores: list, score: Callable) -> None:
    """Fill each scores[k].seconds with models[k]'s per-item time, as TIMING says (score(model) -> ItemScores)."""
    passes = [[score(m).seconds for m in models] for _ in range(2)]
    for k, s in enumerate(scores):
        s.seconds = [min(a, b) for a, b in zip(passes[0][k], passes[1][k])]


def sweep(small: list[float], large: list[float], confidence: list[float], small_cost: list[float],
          large_cost: list[float]) -> list[dict]:  # fmt: skip
    """(tau, accuracy, cost_ratio, escalated) for each distinct threshold, from nothing to everything escalated."""
    n = len(small)
    alone = sum(large_cost)
    order = sorted(range(n), key=lambda i: confidence[i])
    acc, cost = sum(small), sum(small_cost)
    points = [_point(confidence[order[0]] if n else 0.0, acc, cost, 0, n, alone)]
    for k, i in enumerate(order):
        acc += large[i] - small[i]
        cost += large_cost[i]
        nxt = confidence[order[k + 1]] if k + 1 < n else None
        if nxt is None or nxt > confidence[i]:
            points.append(_point(nxt if nxt is not None else ESCALATE_ALL, acc, cost, k + 1, n, alone))
    return points


def _point(tau: float, acc: float, cost: float, escalated: int, n: int, alone: float) -> dict:
    return {"tau": tau, "accuracy": acc / n, "cost_ratio": cost / alone if alone else 0.0, "escalated": escalated / n}


def front(points: list[dict]) -> list[dict]:
    """The thresholds no other beats on both accuracy (higher) and cost (lower)."""
    out, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["cost_ratio"], -p["accuracy"])):
        if p["accuracy"] > best:
            out.append(p)
            best = p["accuracy"]
    return out


def choose(points: list[dict], large_accuracy: float, max_drop: float) -> dict:
    """The cheapest threshold whose accuracy is within `max_drop` of the large model alone (escalating
    everything always is, at more than the large model's cost)."""
    ok = [p for p in points if p["accuracy"] >= large_accuracy - max_drop - 1e-12]
    return min(ok, key=lambda p: (p["cost_ratio"], -p["accuracy"]))


def analyse(small, large, max_drop: float, cost: str = "flops") -> dict:
    """Per confidence measure: its front and its chosen threshold; and the measure whose choice costs least.

    `small` and `large` are tasks.ItemScores of the same items; `cost` "flops" (counted; scored with
    flops=True) or "seconds" (measured; time_items).
    """
    large_acc = sum(large.correct) / len(large.correct)
    by = {}
    for measure in CONFIDENCES:
        points = sweep(
            small.correct, large.correct, small.confidence[measure], getattr(small, cost), getattr(large, cost)
        )
        by[measure] = {"chosen": choose(points, large_acc, max_drop), "front": front(points)}
    best = min(CONFIDENCES, key=lambda m: (by[m]["chosen"]["cost_ratio"], CONFIDENCES.index(m)))
    return {
        "small_accuracy": sum(small.correct) / len(small.correct),
        "large_accuracy": large_acc,
        "small_cost_ratio": sum(getattr(small, cost)) / sum(getattr(large, cost)),
        "max_drop": max_drop,
        "measures": by,
        "best": best,
        "cost": {"flops": "FLOPs counted as the models ran", "seconds": "wall time as the models ran, " + TIMING}[cost]
        + ", as a ratio to the large model alone",
    }
