"""Paired, interleaved timing: how much faster A runs than B, with a 95% confidence interval.

Two processes timed minutes apart on a shared machine are not comparable: bursts of contention,
frequency changes and cache state move a 2-core VM's timings by tens of percent. So A and B are
timed in one process, in blocks of four samples in ABBA order (BAAB in every other block): a
drift that is linear over a block hits A and B alike, and a burst hits whichever samples it
lands on, in both orders over the run. Each sample repeats its call until it lasts at least
`min_sample_s` (like MLPerf's minimum run duration), so a short call is not timer noise.

Per block i: d_i = log(mean B time) - log(mean A time). The speedup of A over B is exp(mean d)
and its interval exp(mean d +- t * sd(d) / sqrt(n)), Student's t with n - 1 degrees of freedom
over the blocks (log-ratio, t; blocks are the independent units). Blocks are added until the
interval's relative half-width, exp(t * se) - 1, is at most the target, or the time budget or
block cap runs out; the result says which. Stopping on the interval makes the coverage slightly
below nominal (optional stopping); `min_blocks` keeps that small.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class PairedConfig:
    target_halfwidth: float = 0.03
    """Stop once the speedup's 95% interval is within +-this fraction (exp(t * se) - 1)."""
    budget_s: float = 60.0
    """Stop adding blocks after this many seconds of timing, target met or not."""
    min_sample_s: float = 0.05
    """Each sample repeats its call until it lasts at least this long: far above the timer's
    resolution, and short enough that A's and B's samples follow each other within a burst."""
    min_blocks: int = 10
    """Blocks (of ABBA) before the stopping rule is first asked."""
    max_blocks: int = 400
    confidence: float = 0.95


@dataclass
class PairedResult:
    speedup: float
    """time(B) / time(A): above 1, A is faster."""
    ci_low: float
    ci_high: float
    halfwidth: float
    """exp(t * se) - 1: the interval's relative half-width on the ratio scale."""
    n_blocks: int
    calls_per_sample: int
    met_target: bool
    stopped_by: str
    """'target', 'budget' or 'max_blocks'."""
    seconds_a: list[float] = field(default_factory=list)
    """Per-call seconds of every A sample, in schedule order."""
    seconds_b: list[float] = field(default_factory=list)
    block_log_ratios: list[float] = field(default_factory=list)

    def protocol(self, config: PairedConfig) -> dict:
        """What a stored speedup figure says about how it was obtained."""
        return {
            "schedule": "ABBA/BAAB blocks, one process, alternating", "interval": "Student t on per-block log-ratios",
            "confidence": config.confidence, "ci": [self.ci_low, self.ci_high], "halfwidth": self.halfwidth,
            "target_halfwidth": config.target_halfwidth, "met_target": self.met_target, "stopped_by": self.stopped_by,
            "n_blocks": self.n_blocks, "calls_per_sample": self.calls_per_sample, "min_sample_s": config.min_sample_s,
            "budget_s": config.budget_s,
        }  # fmt: skip


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile: bisection on the CDF, integrated from the density by Simpson's rule.

    Written here because it is the one function of scipy this needs, and scipy is no dependency.
    """
    if dof < 1:
        raise ValueError("t_quantile needs at least 1 degree of freedom")
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2


def _t_cdf(x: float, dof: int, steps: int = 400) -> float:
    v = float(dof)
    log_norm = math.lgamma((v + 1) / 2) - math.lgamma(v / 2) - 0.5 * math.log(v * math.pi)
    pdf = lambda t: math.exp(log_norm - (v + 1) / 2 * math.log1p(t * t / v))  # noqa: E731
    h = x / steps
    inner = sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, steps))
    return 0.5 + h / 3 * (pdf(0.0) + inner + pdf(x))


def ratio_interval(log_ratios: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(ratio, low, high, relative half-width) from per-block log-ratios: exp(mean +- t * se)."""
    n = len(log_ratios)
    mean = statistics.fmean(log_ratios)
    if n < 2:
        return math.exp(mean), 0.0, math.inf, math.inf
    se = statistics.stdev(log_ratios) / math.sqrt(n)
    t = t_quantile(0.5 + confidence / 2, n - 1)
    return math.exp(mean), math.exp(mean - t * se), math.exp(mean + t * se), math.expm1(t * se)


def time_paired(run_a: Callable[[], object], run_b: Callable[[], object], config: PairedConfig = PairedConfig(),
                *, clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None) -> PairedResult:  # fmt: skip
    """Time `run_a` against `run_b` (each one call of the workload, warmed up by the caller).

    `sync` (e.g. torch.cuda.synchronize) runs before each clock read on devices that queue work.
    """
    sync = sync or (lambda: None)
    calls = _calls_per_sample(run_a, run_b, config.min_sample_s, clock, sync)

    def sample(fn) -> float:
        sync()
        t0 = clock()
        for _ in range(calls):
            fn()
        sync()
        return (clock() - t0) / calls

    seconds_a, seconds_b, log_ratios = [], [], []
    start, stopped_by = clock(), "max_blocks"
    for block in range(config.max_blocks):
        order = (run_a, run_b, run_b, run_a) if block % 2 == 0 else (run_b, run_a, run_a, run_b)
        times = [sample(fn) for fn in order]
        a = [t for fn, t in zip(order, times) if fn is run_a]
        b = [t for fn, t in zip(order, times) if fn is run_b]
        seconds_a += a
        seconds_b += b
        log_ratios.append(math.log(statistics.fmean(b)) - math.log(statistics.fmean(a)))
        if len(log_ratios) >= config.min_blocks:
            if ratio_interval(log_ratios, config.confidence)[3] <= config.target_halfwidth:
                stopped_by = "target"
                break
            if clock() - start >= config.budget_s:
                stopped_by = "budget"
                break
    ratio, low, high, half = ratio_interval(log_ratios, config.confidence)
    return PairedResult(ratio, low, high, half, len(log_ratios), calls, half <= config.target_halfwidth, stopped_by,
                        seconds_a, seconds_b, log_ratios)  # fmt: skip


def _calls_per_sample(run_a, run_b, min_sample_s: float, clock, sync) -> int:
    """Calls per sample so that the slower of the two lasts at least `min_sample_s` (one timed call each)."""
    single = []
    for fn in (run_a, run_b):
        sync()
        t0 = clock()
        fn()
        sync()
        single.append(clock() - t0)
    return max(1, math.ceil(min_sample_s / max(min(single), 1e-9)))


COMPETING_CORES = 0.25
"""Other processes (or other VMs, through steal time) using more than this many cores on average
during a timing: it is flagged as competed."""


def machine_conditions(threads: int | None = None) -> dict:
    """What else the machine was doing and how it was set: load average, governor, frequency,
    affinity, and CPU-time counters that `competition` turns into the cores others used.

    `competing` here is the load-average test (1-minute load above this process's threads + 0.5):
    a lagging hint; `competition` over two snapshots is the measure.
    """
    load1, load5, _ = os.getloadavg()
    cpu = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    times = os.times()
    out = {"load_avg_1m": load1, "load_avg_5m": load5, "cpus": os.cpu_count(),
           "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "governor": _read(cpu / "scaling_governor"), "freq_khz": _read(cpu / "scaling_cur_freq"),
           "busy_cpu_s": _busy_cpu_s(), "self_cpu_s": times.user + times.system, "clock_s": time.monotonic()}  # fmt: skip
    if threads is not None:
        out["threads"] = threads
        out["competing"] = load1 > threads + 0.5
    return out


def competition(before: dict, after: dict) -> dict:
    """Cores other processes (and, through steal time, other VMs) used on average between two
    snapshots of `machine_conditions`: the machine's busy CPU time (/proc/stat, all but idle and
    iowait) minus this process's own, over the wall time. Empty where /proc/stat is unreadable."""
    wall = after["clock_s"] - before["clock_s"]
    if before.get("busy_cpu_s") is None or after.get("busy_cpu_s") is None or wall <= 0:
        return {}
    others = (after["busy_cpu_s"] - before["busy_cpu_s"] - (after["self_cpu_s"] - before["self_cpu_s"])) / wall
    others = max(0.0, others)
    return {"other_cores": others, "competed": others > COMPETING_CORES,
            "rule": f"competed: other processes used more than {COMPETING_CORES} cores on average"}  # fmt: skip


def _busy_cpu_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def result_dict(result: PairedResult, config: PairedConfig) -> dict:
    """The result as plain data (for JSON), samples included."""
    return {**asdict(result), "config": asdict(config)}
