"""Energy over a timed region: hardware counters where readable, else a stated power model.

- NVIDIA GPU: NVML's total-energy counter of the device (millijoules since driver load), read
  before and after; method `measured`. Needs `pip install frugalm[gpu]` (nvidia-ml-py).
- CPU with readable RAPL (/sys/class/powercap/intel-rapl:N/energy_uj, Intel and recent AMD):
  package energy of every socket, wrap-around handled; method `measured`. It covers the whole
  package, other processes included: run on a quiet machine. The environment variable
  FRUGALM_RAPL_ROOT names another powercap folder (tests point it at a fabricated or an absent
  one, so the label is decided by the counters given, not by the host).
- Otherwise `estimated` with the linear utilization model of the Cloud Carbon Footprint
  methodology: P = watts_idle + u * (watts_max - watts_idle), with the profile's watts and
  u = this process's CPU seconds / (wall seconds * logical CPUs). On a GPU without NVML, u = 1
  (an upper bound), and the protocol says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from frugalm.measure.cost import HardwareProfile

RAPL_ROOT = Path("/sys/class/powercap")
RAPL_ROOT_ENV = "FRUGALM_RAPL_ROOT"


def rapl_root() -> Path:
    """The powercap folder read for RAPL counters: $FRUGALM_RAPL_ROOT, else RAPL_ROOT."""
    return Path(os.environ[RAPL_ROOT_ENV]) if os.environ.get(RAPL_ROOT_ENV) else RAPL_ROOT


def _rapl_packages() -> list[Path]:
    """Top-level RAPL package zones whose counters this process can read."""
    zones = []
    for zone in sorted(rapl_root().glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and os.access(zone / "energy_uj", os.R_OK):
            try:
                int((zone / "energy_uj").read_text())
                zones.append(zone)
            except (OSError, ValueError):
                continue
    return zones


def _nvml_handle(device: torch.device):
    try:
        import pynvml  # deferred: the optional `gpu` extra (nvidia-ml-py), absent on CPU machines
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where unsupported
        return handle
    except pynvml.NVMLError:
        return None


class EnergyMeter:
    """Context manager: joules spent by the device over the region, with method and protocol."""

    def __init__(self, device: torch.device, profile: HardwareProfile):
        self.device, self.profile = device, profile
        self.nvml = _nvml_handle(device) if device.type == "cuda" else None
        self.rapl = _rapl_packages() if device.type == "cpu" else []
        self.joules = 0.0

    @property
    def method(self) -> str:
        return "measured" if (self.nvml is not None or self.rapl) else "estimated"

    def _rapl_uj(self) -> dict[Path, int]:
        return {z: int((z / "energy_uj").read_text()) for z in self.rapl}

    def __enter__(self):
        self._t0, self._cpu0 = time.perf_counter(), _cpu_seconds()
        if self.nvml is not None:
            import pynvml  # deferred: the optional `gpu` extra (nvidia-ml-py)

            self._nvml_mj0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.nvml)
        self._rapl0 = self._rapl_uj()
        return self

    def __exit__(self, *exc):
        self.joules = self.so_far()
        return False

    def so_far(self) -> float:
        """Joules since the region began, read now (the region goes on); sets wall_s and cpu_s to now."""
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = _cpu_seconds() - self._cpu0
        if self.nvml is not None:
            import pynvml  # deferred: the optional `gpu` extra (nvidia-ml-py)

            return (pynvml.nvmlDeviceGetTotalEnergyConsumption(self.nvml) - self._nvml_mj0) / 1e3
        if self.rapl:
            return sum(self._rapl_delta_uj(z, uj) for z, uj in self._rapl_uj().items()) / 1e6
        return self._estimate()

    def _rapl_delta_uj(self, zone: Path, end_uj: int) -> int:
        delta = end_uj - self._rapl0[zone]
        if delta < 0:  # the counter wrapped around during the region
            delta += int((zone / "max_energy_range_uj").read_text())
        return delta

    def utilization(self) -> float:
        if self.device.type == "cuda":
            return 1.0
        return min(1.0, self.cpu_s / max(1e-9, self.wall_s * (os.cpu_count() or 1)))

    def _estimate(self) -> float:
        p = self.profile
        watts = p.watts_idle + self.utilization() * (p.watts_max - p.watts_idle)
        return watts * self.wall_s

    def protocol(self) -> dict:
        base = {"wall_s": self.wall_s, "joules": self.joules}
        if self.nvml is not None:
            return {**base, "counter": "NVML nvmlDeviceGetTotalEnergyConsumption (device)"}
        if self.rapl:
            return {
                **base,
                "counter": "RAPL package energy_uj",
                "zones": [z.name for z in self.rapl],
                "note": "whole package, other processes included",
            }
        return {
            **base,
            "model": "P = watts_idle + u * (watts_max - watts_idle) (Cloud Carbon Footprint linear model)",
            "profile": self.profile.name,
            "watts_idle": self.profile.watts_idle,
            "watts_max": self.profile.watts_max,
            "utilization": self.utilization(),
            "utilization_source": "assumed 1 (no NVML): upper bound"
            if self.device.type == "cuda"
            else "process CPU seconds / (wall * logical CPUs)",
            "cpu_s": self.cpu_s,
            "logical_cpus": os.cpu_count(),
        }


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
