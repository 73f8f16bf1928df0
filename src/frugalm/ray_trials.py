"""Search trials as Ray tasks (`--ray local` or `--ray ADDRESS`; `pip install 'frugalm[ray]'`).

Each trial is one Ray task needing one unit of the custom resource `frugalm_trial`. A node
offers one unit (`ray start --resources='{"frugalm_trial": 1}'`; `--ray local` starts such a
one-node cluster), so a node measures one trial at a time and no two timings ever share its
cores, while a cluster of k nodes measures k trials at once. A task builds and measures its trial
into a scratch store and folder on its node (`trials.measure_remote`) and returns the runs and
the artifact's files, which the coordinator lands in its own store and output folder: the
figures are those the node measured, stored exactly as a local trial's. Nodes need frugalm
installed and the model and data at the same paths (a shared disk, or the same image).
"""

from __future__ import annotations

import contextlib
import os
import socket
from concurrent.futures import Future

import torch

from frugalm.errors import ConfigError
from frugalm.trials import Shipped, TrialSpec, measure_remote

RESOURCE = "frugalm_trial"
START_HINT = f"""start one with `ray start --head --resources='{{"{RESOURCE}": 1}}'` (and each worker node likewise), or pass --ray local"""


def _ray():
    try:
        import ray  # deferred: an optional extra (frugalm[ray]), imported only when --ray is given
    except ImportError:
        raise ConfigError("--ray needs Ray, which is not installed: pip install 'frugalm[ray]'") from None
    return ray


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """One line, fast, when nothing listens at a cluster address (Ray itself retries for minutes)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray '{address}' is not 'local' or a cluster address HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at '{address}' ({exc.strerror or exc}); {START_HINT}") from None


@contextlib.contextmanager
def cluster(address: str):
    """Connected to (or, for 'local', running) a Ray cluster; yields the number of trial slots."""
    check_address(address)
    ray = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "local":
        ray.init(num_cpus=os.cpu_count() or 1, resources={RESOURCE: 1}, **quiet)
    else:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"cannot join the Ray cluster at '{address}' ({str(exc).splitlines()[0]}); {START_HINT}"
            ) from None
    try:
        slots = int(ray.cluster_resources().get(RESOURCE, 0))
        if slots < 1:
            raise ConfigError(f"the Ray cluster at '{address}' offers no '{RESOURCE}' resource; {START_HINT}")
        yield slots
    finally:
        ray.shutdown()


def submit(spec: TrialSpec) -> Future:
    """Run `measure_remote(spec)` as a task on a node with a free trial slot; a Future of its Shipped."""
    ray = _ray()
    task = ray.remote(measure_remote).options(resources={RESOURCE: 1}, num_cpus=0, max_retries=0)
    return task.remote(spec, (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))).future()


__all__ = ["RESOURCE", "Shipped", "check_address", "cluster", "submit"]
