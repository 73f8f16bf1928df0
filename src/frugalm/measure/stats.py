"""Statistics of raw samples: percentiles and spread. Pure functions, no numpy needed."""

from __future__ import annotations

import math
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
