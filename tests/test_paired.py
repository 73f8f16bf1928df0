"""Paired timing: the interval arithmetic against known distributions, and the stopping rule (no timed assertion)."""

import math
import random

import pytest

from frugalm.measure.paired import (
    PairedConfig,
    competition,
    machine_conditions,
    ratio_interval,
    t_quantile,
    time_paired,
)


@pytest.mark.parametrize(
    ("dof", "expected"),
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (9, 2.2622), (29, 2.0452), (120, 1.9799)],
)
def test_t_quantile_matches_the_table(dof, expected):
    assert t_quantile(0.975, dof) == pytest.approx(expected, abs=2e-3)


def test_interval_covers_a_known_ratio_at_its_nominal_rate():
    """Lognormal block noise around a true speedup of 1.3: about 95% of 95% intervals hold it."""
    rng, true, covered, trials = random.Random(0), 1.3, 0, 2000
    for _ in range(trials):
        log_ratios = [math.log(true) + rng.gauss(0, 0.1) for _ in range(8)]
        _, low, high, _ = ratio_interval(log_ratios)
        covered += low <= true <= high
    assert 0.935 <= covered / trials <= 0.965


def test_interval_of_identical_samples_is_the_point():
    ratio, low, high, half = ratio_interval([math.log(2.0)] * 5)
    assert (
        ratio == pytest.approx(2.0)
        and low == pytest.approx(2.0)
        and high == pytest.approx(2.0)
        and half == pytest.approx(0.0)
    )


class FakeWork:
    """Two workloads on a simulated clock: each call advances it by its cost times a noise factor."""

    def __init__(self, cost_a: float, cost_b: float, noise: float, seed: int = 0, drift: float = 0.0):
        self.now, self.rng, self.noise, self.drift = 0.0, random.Random(seed), noise, drift
        self.cost = {"a": cost_a, "b": cost_b}

    def clock(self) -> float:
        return self.now

    def call(self, which: str):
        def run():
            slow = 1.0 + self.drift * self.now  # the machine slows down over time: hits both alike
            self.now += self.cost[which] * slow * math.exp(self.rng.gauss(0, self.noise))

        return run


def test_noise_free_timing_stops_at_the_minimum_blocks_with_the_exact_ratio():
    w = FakeWork(0.01, 0.02, noise=0.0)
    result = time_paired(w.call("a"), w.call("b"), PairedConfig(min_sample_s=0.1, min_blocks=6), clock=w.clock)
    assert result.stopped_by == "target" and result.met_target and result.n_blocks == 6
    assert result.speedup == pytest.approx(2.0) and result.calls_per_sample == 10


def test_drift_is_cancelled_by_the_abba_schedule():
    w = FakeWork(0.01, 0.01, noise=0.0, drift=0.05)
    result = time_paired(
        w.call("a"), w.call("b"), PairedConfig(min_sample_s=0.05, min_blocks=10, target_halfwidth=0.0), clock=w.clock
    )
    assert result.speedup == pytest.approx(
        1.0, abs=0.003
    )  # an AAAA...BBBB schedule would report the drift as a speedup


def test_noisy_timing_runs_until_the_target_is_met():
    w = FakeWork(0.01, 0.013, noise=0.15, seed=1)
    config = PairedConfig(min_sample_s=0.05, target_halfwidth=0.03, budget_s=1e9)
    result = time_paired(w.call("a"), w.call("b"), config, clock=w.clock)
    assert result.stopped_by == "target" and result.halfwidth <= 0.03 and result.n_blocks > config.min_blocks
    assert result.ci_low <= 1.3 <= result.ci_high


def test_budget_stops_a_timing_that_cannot_meet_its_target():
    w = FakeWork(0.01, 0.01, noise=0.5, seed=2)
    config = PairedConfig(min_sample_s=0.01, target_halfwidth=0.001, budget_s=2.0)
    result = time_paired(w.call("a"), w.call("b"), config, clock=w.clock)
    assert result.stopped_by == "budget" and not result.met_target and result.halfwidth > 0.001
    assert result.protocol(config)["met_target"] is False


def test_machine_conditions_flags_competition():
    conditions = machine_conditions(threads=0)
    assert {"load_avg_1m", "governor", "affinity"} <= conditions.keys()
    assert conditions["competing"] == (conditions["load_avg_1m"] > 0.5)


def test_competition_is_the_cores_other_processes_used():
    before = {"busy_cpu_s": 100.0, "self_cpu_s": 10.0, "clock_s": 50.0}
    after = {"busy_cpu_s": 106.0, "self_cpu_s": 14.0, "clock_s": 54.0}  # 6 busy core-seconds, 4 ours, over 4 s
    assert competition(before, after)["other_cores"] == pytest.approx(0.5)
    assert competition(before, after)["competed"]
    quiet = {**after, "busy_cpu_s": 104.4}
    assert not competition(before, quiet)["competed"]
    assert competition({**before, "busy_cpu_s": None}, after) == {}
