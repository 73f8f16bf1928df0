"""frugalm: make causal language models cheaper to train, adapt and run, and prove by how much.

The public API is imported lazily so that `import frugalm` stays cheap (no torch import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "FrugalmError": "frugalm.errors",
    "load_model": "frugalm.models",
    "bench": "frugalm.benchmark.api",
    "Store": "frugalm.store",
    "METRICS": "frugalm.measure.metrics",
    "WORKLOADS": "frugalm.measure.workloads",
    "BENCHMARK_VERSION": "frugalm.measure.metrics",
}

if TYPE_CHECKING:  # pragma: no cover
    from frugalm.benchmark.api import bench  # noqa: F401 (names of the lazy API, for type checkers)
    from frugalm.errors import FrugalmError  # noqa: F401 (names of the lazy API, for type checkers)
    from frugalm.measure.metrics import BENCHMARK_VERSION, METRICS  # noqa: F401 (names of the lazy API, for type checkers)
    from frugalm.measure.workloads import WORKLOADS  # noqa: F401 (names of the lazy API, for type checkers)
    from frugalm.models import load_model  # noqa: F401 (names of the lazy API, for type checkers)
    from frugalm.store import Store  # noqa: F401 (names of the lazy API, for type checkers)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'frugalm' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
