"""Memory: parameters, bytes of weights in memory, artifact size, and peak memory of a workload.

Peak memory on CPU is the resident set of the measuring child process. Linux keeps a
high-water mark (VmHWM) that can be reset to the current RSS by writing 5 to
/proc/self/clear_refs, so the peak is taken over the workload alone, not over model loading.
The interpreter's baseline (RSS after importing torch and transformers, before the model) is
subtracted and recorded. Where the reset is not allowed, the peak covers the whole process
life, and the protocol says so.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from pathlib import Path

import psutil
import torch

MIB = 1 << 20


def params_count(model) -> int:
    """Parameters, tied weights counted once (model.parameters() deduplicates shared tensors),
    including weights stored as packed low-bit codes (modules report them via `packed_params()`)."""
    packed = sum(m.packed_params() for m in model.modules() if hasattr(m, "packed_params"))
    return sum(p.numel() for p in model.parameters()) + packed


def weights_bytes(model) -> int:
    """Bytes of parameters and buffers as they lie in memory (packed formats count as packed).

    Modules whose weights live inside an opaque kernel object (fbgemm's packed int8) report
    them through a `weight_bytes()` method. Weights offloaded to disk (on the meta device
    between their block's forwards) are not in memory and do not count.
    """
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:  # offloaded to disk (runtime/offload): not in memory
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total + sum(m.weight_bytes() for m in model.modules() if hasattr(m, "weight_bytes"))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in sorted(Path(path).rglob("*")) if f.is_file())


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024

    return psutil.Process().memory_info().rss


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), so an earlier step's garbage
    does not count in the next peak. A no-op where glibc is absent."""

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a region: CUDA allocator peak, or the process's RSS high-water mark."""

    def __init__(self, device: torch.device, baseline_bytes: int):
        self.device = device
        self.baseline = baseline_bytes
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
        else:
            _release_free_memory()
            self.method = "rss_hwm_reset" if self._reset_hwm() else "rss_hwm_process_lifetime"
        return self

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM")
            if hwm is None:  # not Linux: ru_maxrss is the lifetime peak (bytes on macOS)
                r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                hwm = r // 1024 if sys.platform == "darwin" else r
                self.method = "ru_maxrss_process_lifetime"
            self.peak = hwm * 1024
        return False

    def protocol(self) -> dict:
        on_gpu = self.device.type == "cuda"
        return {
            "method": self.method,
            "peak_bytes": self.peak,
            "baseline_bytes": 0 if on_gpu else self.baseline,
            "note": "allocator peak of tensors on the device"
            if on_gpu
            else "peak RSS of the measuring child minus its RSS after imports, before the model loaded",
        }

    @property
    def peak_over_baseline_mib(self) -> float:
        base = 0 if self.device.type == "cuda" else self.baseline
        return (self.peak - base) / MIB
