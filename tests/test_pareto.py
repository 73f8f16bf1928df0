import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugalm.errors import ConfigError
from frugalm.pareto import Constraint, hypervolume, non_dominated, satisfying

# ppl_tok is lower-is-better, decode_tok_s higher-is-better, weights_mib lower-is-better.
OBJ2 = ("ppl_tok", "decode_tok_s")
OBJ3 = ("ppl_tok", "decode_tok_s", "weights_mib")
coord = st.integers(0, 8).map(float)


def _points(objectives, n_max=7):
    return st.lists(st.fixed_dictionaries({o: coord for o in objectives}), min_size=1, max_size=n_max)


def _better_or_equal(a, b, o):
    return a[o] >= b[o] if o == "decode_tok_s" else a[o] <= b[o]


def _brute_front(points, objectives):
    def dominated(i):
        return any(
            all(_better_or_equal(q, points[i], o) for o in objectives) and any(q[o] != points[i][o] for o in objectives)
            for j, q in enumerate(points)
            if j != i
        )

    return [i for i in range(len(points)) if not dominated(i)]


def _brute_hv(points, objectives, ref):
    # Count unit cells of the integer grid between each point and the reference.
    lo = {o: min([p[o] for p in points] + [ref[o]]) for o in objectives}
    hi = {o: max([p[o] for p in points] + [ref[o]]) for o in objectives}
    volume = 0
    for cell in itertools.product(*[range(int(lo[o]), int(hi[o])) for o in objectives]):
        centre = {o: c + 0.5 for o, c in zip(objectives, cell)}
        inside_ref = all(centre[o] > ref[o] if o == "decode_tok_s" else centre[o] < ref[o] for o in objectives)
        covered = any(all(_better_or_equal(p, centre, o) for o in objectives) for p in points)
        volume += inside_ref and covered
    return float(volume)


@settings(max_examples=150, deadline=None)
@given(points=_points(OBJ3))
def test_front_matches_brute_force(points):
    assert non_dominated(points, OBJ3) == _brute_front(points, OBJ3)


def _brute_front_with_margins(points, margins, objectives):
    """A point leaves the front only for one better beyond both margins somewhere, worse beyond them nowhere."""

    def beats(q, mq, p, mp, o):  # q better than p beyond the noise on o
        gap = q[o] - p[o] if o == "decode_tok_s" else p[o] - q[o]
        return gap > mq[o] + mp[o]

    def dominated(i):
        return any(
            all(not beats(points[i], margins[i], q, margins[j], o) for o in objectives)
            and any(beats(q, margins[j], points[i], margins[i], o) for o in objectives)
            for j, q in enumerate(points)
            if j != i
        )

    front = [i for i in range(len(points)) if not dominated(i)]
    return front or _brute_front(points, objectives)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_front_with_margins_matches_brute_force(data):
    points = data.draw(_points(OBJ3))
    margins = data.draw(
        st.lists(
            st.fixed_dictionaries({o: st.integers(0, 2).map(float) for o in OBJ3}),
            min_size=len(points),
            max_size=len(points),
        )
    )
    front = non_dominated(points, OBJ3, margins)
    assert front == _brute_front_with_margins(points, margins, OBJ3)
    zero = [{o: 0.0 for o in OBJ3} for _ in points]
    assert non_dominated(points, OBJ3, zero) == non_dominated(points, OBJ3)


def test_a_speedup_within_the_noise_does_not_make_a_worse_variant_optimal():
    baseline = {"ppl_tok": 3.6, "decode_tok_s": 200.0}
    pruned = {"ppl_tok": 4.6, "decode_tok_s": 320.0}  # "faster" than int8 only by noise
    int8 = {"ppl_tok": 3.65, "decode_tok_s": 300.0}
    noise = [{"decode_tok_s": 0.1 * p["decode_tok_s"]} for p in (baseline, pruned, int8)]
    assert non_dominated([baseline, pruned, int8], OBJ2) == [0, 1, 2]
    assert non_dominated([baseline, pruned, int8], OBJ2, noise) == [0, 2]


@settings(max_examples=150, deadline=None)
@given(points=_points(OBJ2, 8))
def test_hypervolume_2d_matches_brute_force(points):
    ref = {"ppl_tok": 9.0, "decode_tok_s": -1.0}
    assert hypervolume(points, OBJ2, ref) == pytest.approx(_brute_hv(points, OBJ2, ref))


@settings(max_examples=80, deadline=None)
@given(points=_points(OBJ3, 5))
def test_hypervolume_3d_matches_brute_force(points):
    ref = {"ppl_tok": 9.0, "decode_tok_s": -1.0, "weights_mib": 9.0}
    assert hypervolume(points, OBJ3, ref) == pytest.approx(_brute_hv(points, OBJ3, ref))


def test_constraints_relative_and_absolute():
    base = {"ppl_tok": 4.0, "decode_tok_s": 10.0}
    pts = [base, {"ppl_tok": 4.1, "decode_tok_s": 50.0}, {"ppl_tok": 6.0, "decode_tok_s": 90.0}]
    assert satisfying(pts, [Constraint.parse("ppl_tok<=+5%")], base) == [0, 1]
    assert satisfying(pts, [Constraint.parse("decode_tok_s >= 40")], base) == [1, 2]
    assert satisfying(pts, [Constraint.parse("ppl_tok<=+5%"), Constraint.parse("decode_tok_s>=40")], base) == [1]
    with pytest.raises(ConfigError, match="unknown metric 'ppl'"):
        Constraint.parse("ppl<=5")
    with pytest.raises(ConfigError, match="must look like"):
        Constraint.parse("ppl_tok < 5")
    with pytest.raises(ConfigError, match="no figure"):
        non_dominated([{"ppl_tok": 1.0}], OBJ2)
