"""Statistics of raw samples: percentiles and spread. Pure functions, no numpy needed."""

from __future__ import annotations

import math
import random
import statistics


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(samples: list[float]) -> float | None:
    """Sample standard deviation; None for fewer than two samples."""
    return statistics.stdev(samples) if len(samples) > 1 else None


def bootstrap_delta(
    a: list[float], b: list[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """mean(a) - mean(b) over paired items, with percentile-bootstrap intervals.

    `ci` resamples items (the same indices for a and b: paired), `ci_unpaired` resamples a and b
    each on its own, as if they had been scored on different items; on the same items the paired
    interval is the narrower the more the two agree item by item. Seeded, so a report rebuilt from
    the same scores shows the same interval. Why bootstrap and not a normal approximation: item
    scores are 0/1 with accuracies near 0 or 1 on small models, where Wald intervals undercover.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same, non-zero number of items (got {len(a)} and {len(b)})")
    n = len(a)
    rng = random.Random(seed)
    diff = [x - y for x, y in zip(a, b)]
    paired, unpaired = [], []
    for _ in range(resamples):
        idx = rng.choices(range(n), k=n)
        paired.append(sum(diff[i] for i in idx) / n)
        other = rng.choices(range(n), k=n)
        unpaired.append((sum(a[i] for i in idx) - sum(b[i] for i in other)) / n)
    q = (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)
    lo, hi = (percentile(paired, x) for x in q)
    ulo, uhi = (percentile(unpaired, x) for x in q)
    return {
        "delta": sum(diff) / n,
        "ci": [lo, hi],
        "ci_unpaired": [ulo, uhi],
        "items": n,
        "discordant": sum(1 for d in diff if d),
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "method": "percentile bootstrap over items, paired (same resampled items for both)",
    }
