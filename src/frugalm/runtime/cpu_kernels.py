"""frugalm's own CPU kernels (`cpu_kernels.cpp`, ops in `torch.ops.frugalm`), where torch has none fast enough.

`int8_rows`: a few rows (decode) of a w8a16 layer. ATen's `_weight_int8pack_mm` is the only int8
weight-only CPU kernel torch ships, and at one row it is compute-bound well below memory
bandwidth (benchmarks/bench_kernels.py --only int8: 9.6-12.9 GB/s of int8 codes read from
memory at the stand-in's layer shapes, where bench_decode.py's paired bandwidth limit reads
15-17 GB/s), so int8 decode gained 1.3-1.5x over float32 where its bytes promise 4x. Inductor's
C++ GEMM template does better but only on weights frozen into the graph as constants (a second
copy of every weight); torchao's int8 weight-only CPU path is that same inductor
lowering. This kernel keeps ATen's contract (bfloat16 activations in and out, int8 codes [N, K],
one bfloat16 scale per row, float32 accumulation, the same rounding: equal outputs, tested) on
the same stored codes, and differs in three ways that make it faster at one row: four weight
rows share each load of the activations, the activations are widened to float32 once per call
rather than per row, and it prefetches the weight stream 4 KiB ahead (the same bench, paired and
interleaved on the same codes: 1.37-1.60x ATen's kernel, 13.2-20.8 GB/s of codes).

`codes_attention`: one query token's attention over a packed KV cache's codes (int8, or int4 two
per byte; runtime/kv_cache). Written with torch ops, the codes must first be cast to a float
workspace (a write and a read of four bytes per value) before two matmuls read them again, in
~17 small ops per layer: at long contexts that made the int8 cache slower than the float one.
This is one call per layer that reads each code once, as a byte (see the .cpp for the split
softmax it uses).

They are C++ built on first use with torch's extension builder (ninja and the C++ compiler that
torch.compile's inductor also needs), once per machine, CPU capability and torch version, into
torch's extension folder. Where they cannot be built (no compiler), `available()` is False:
w8a16 layers keep ATen's kernel and the KV cache its torch-op path; the kernel names in the scorecard say
which ran.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx2", "-mfma"],
    "AVX512_BF16": ["-mavx512f", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
"""Compiler flags per `torch.backends.cpu.get_cpu_capability()`: the build targets the ISA torch itself dispatches to."""


@functools.cache
def available() -> bool:
    """Build (first call on a machine) and load the kernel; False, with the reason logged, where it cannot be."""
    from torch.utils import cpp_extension  # deferred: it imports setuptools; only the first build needs it

    isa = torch.backends.cpu.get_cpu_capability()
    try:
        import ninja  # deferred: only to put its binary on PATH for torch's builder

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass  # a system ninja may still be on PATH
    try:
        cpp_extension.load(
            # one build per CPU capability and torch version: a build against another torch's ABI must not load
            name=f"frugalm_cpu_kernels_{isa.lower()}_torch{re.sub(r'[^0-9a-zA-Z]', '_', torch.__version__)}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure (no compiler, no ninja, ...) means ATen's kernel
        log.warning(
            "frugalm's CPU kernels could not be built (%s); w8a16 layers use ATen's kernel, packed KV caches torch ops",
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return False
    torch.library.register_fake("frugalm::int8_rows", _rows_shape)  # what torch.compile traces with
    return True


def loaded() -> bool:
    """Whether the kernel is loaded in this process (never starts a build)."""
    return available.cache_info().currsize > 0 and available()


def _rows_shape(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])
