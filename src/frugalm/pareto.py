"""Pareto fronts and hypervolume: pure functions of stored figures.

Directions come from the metric registry (`higher_is_better`), never from the caller's
guesswork: every objective is turned into "lower is better" once, here, by negating the
higher-is-better ones. Written by hand because the job is small and exact; libraries that do
it (pymoo, botorch) bring far heavier dependencies than these ~100 lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from frugalm.errors import ConfigError
from frugalm.measure.metrics import get_metric

Point = Mapping[str, float]


def _minimized(points: Sequence[Point], objectives: Sequence[str]) -> list[tuple[float, ...]]:
    signs = [-1.0 if get_metric(name).higher_is_better else 1.0 for name in objectives]
    rows = []
    for i, p in enumerate(points):
        missing = [o for o in objectives if o not in p]
        if missing:
            raise ConfigError(f"point {i} has no figure for {missing}; measure those metrics for every variant")
        rows.append(tuple(s * float(p[o]) for s, o in zip(signs, objectives)))
    return rows


def dominates(a: Sequence[float], b: Sequence[float], margin: Sequence[float] | None = None) -> bool:
    """a dominates b (all objectives minimized): no worse everywhere, better somewhere.

    With `margin` (per objective, >= 0), differences up to the margin are ties: a must be no
    worse than b + margin everywhere and better than b - margin somewhere.
    """
    m = margin or [0.0] * len(a)
    return all(x <= y + e for x, y, e in zip(a, b, m)) and any(x < y - e for x, y, e in zip(a, b, m))


def non_dominated(
    points: Sequence[Point], objectives: Sequence[str], margins: Sequence[Point] | None = None
) -> list[int]:
    """Indices of the points no other point dominates (duplicates all stay), in input order.

    `margins` gives, per point and objective, the half-width within which its figure cannot be
    told apart from another (timing noise; 0 for counted or deterministic figures). Two figures
    then tie when they differ by no more than the sum of their margins, so a variant is only
    pushed off the front by one that is better beyond the noise: a variant whose "speed-up" is
    noise stays dominated by the baseline it does not really beat. With uneven margins, ties are
    not transitive and every point could, in principle, be dominated by another; the classic
    front (no margins) is returned then.
    """
    rows = _minimized(points, objectives)
    if margins is None:
        return [i for i, r in enumerate(rows) if not any(dominates(o, r) for j, o in enumerate(rows) if j != i)]
    if len(margins) != len(points):
        raise ValueError(f"{len(margins)} margins for {len(points)} points")
    m = [[abs(float(mp.get(o, 0.0))) for o in objectives] for mp in margins]
    front = [
        i
        for i, r in enumerate(rows)
        if not any(dominates(o, r, [x + y for x, y in zip(m[j], m[i])]) for j, o in enumerate(rows) if j != i)
    ]
    return front or non_dominated(points, objectives)


def hypervolume(points: Sequence[Point], objectives: Sequence[str], reference: Point) -> float:
    """Volume dominated by the points and bounded by `reference` (a point worse than all of interest).

    Points that do not strictly improve on the reference in every objective add nothing.
    """
    [ref] = _minimized([reference], objectives)
    rows = [r for r in _minimized(points, objectives) if all(x < y for x, y in zip(r, ref))]
    return _hv(rows, list(ref))


def _hv(rows: list[tuple[float, ...]], ref: list[float]) -> float:
    """Hypervolume by slicing along the last objective (exact; fine for tens of points)."""
    if not rows:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(r[0] for r in rows)
    rows = sorted(rows, key=lambda r: r[-1])
    volume = 0.0
    for i, r in enumerate(rows):
        upper = rows[i + 1][-1] if i + 1 < len(rows) else ref[-1]
        depth = upper - r[-1]
        if depth > 0:  # the slab [r[-1], upper) is dominated by the first i+1 points' projections
            volume += depth * _hv([p[:-1] for p in rows[: i + 1]], ref[:-1])
    return volume


_CONSTRAINT = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=)\s*([+-]?[0-9.]+(?:e[+-]?\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Constraint:
    """`metric <= value`, `metric >= value`, or relative to the baseline: `ppl_tok <= +5%`."""

    metric: str
    op: str
    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> Constraint:
        m = _CONSTRAINT.match(text)
        if not m:
            raise ConfigError(
                f"constraint '{text}' must look like 'ppl_tok<=+5%' (relative to the baseline) or 'peak_mem_mib<=200'"
            )
        name, op, value, pct = m.groups()
        get_metric(name)  # an unknown metric is an error naming the valid ones
        return cls(name, op, float(value), relative=bool(pct))

    def bound(self, baseline: float | None) -> float:
        if not self.relative:
            return self.value
        if baseline is None:
            raise ConfigError(f"constraint '{self}' is relative to the baseline, which has no {self.metric} figure")
        return baseline * (1 + self.value / 100)

    def holds(self, value: float, bound: float) -> bool:
        return value <= bound if self.op == "<=" else value >= bound

    def __str__(self) -> str:
        return (
            f"{self.metric} {self.op} {self.value:+g}% of baseline"
            if self.relative
            else f"{self.metric} {self.op} {self.value:g}"
        )


def satisfying(points: Sequence[Point], constraints: Sequence[Constraint], baseline: Point) -> list[int]:
    """Indices of the points meeting every constraint (a point without the figure fails it)."""
    bounds = [(c, c.bound(baseline.get(c.metric))) for c in constraints]
    return [i for i, p in enumerate(points) if all(c.metric in p and c.holds(p[c.metric], b) for c, b in bounds)]
