"""Atomic training checkpoints: a run killed at any moment resumes from its last complete one.

A checkpoint is a folder `step-00000120/` holding one `state.pt`: the model's state dict, the
optimizer's state, the step reached, the loss curve so far, and every random state the loop
draws from (the window-sampling generator, torch's CPU and CUDA generators). It is written into
a hidden temporary folder, flushed to disk, and renamed into place; a rename is atomic on POSIX,
so a folder named `step-*` is always complete and a killed write leaves only a `.partial-*`
folder, which is never loaded and is swept on the next save.

Each checkpoint carries the fingerprint of the run's settings; resuming with other settings is
refused (the weights would silently mix two runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from frugalm.errors import ConfigError

_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Everything the loop needs to continue exactly where it stopped."""

    step: int
    """Optimizer steps completed."""
    model: dict
    optimizer: dict
    generator: torch.Tensor
    """State of the window-sampling torch.Generator."""
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor]
    losses: list[tuple[int, float]]
    pending: tuple[float, int]
    """(loss sum, steps) accumulated since the last loss record."""
    wall_s: float
    """Training wall time spent up to this checkpoint, over every earlier segment of the run."""
    fingerprint: str


def fingerprint(settings: dict) -> str:
    """A short hash of the run's settings (JSON-serialisable), stored with every checkpoint."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(folder: str | os.PathLike, state: TrainState) -> Path:
    """Write `state` as folder/step-NNNNNNNN atomically, then delete the older checkpoints."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".partial-*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved before (a resumed run re-reaching it)
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for older in list_checkpoints(root)[:-1]:
        shutil.rmtree(older, ignore_errors=True)
    return final


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (partial writes are never listed)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.pt").is_file())


def load_latest(folder: str | os.PathLike | None, expected_fingerprint: str) -> TrainState | None:
    """The newest complete checkpoint in `folder`, or None; refuses one from other settings."""
    if folder is None:
        return None
    found = list_checkpoints(folder)
    if not found:
        return None
    raw = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=False)
    state = TrainState(**raw)
    if state.fingerprint != expected_fingerprint:
        raise ConfigError(
            f"checkpoint folder '{folder}' holds a run with other settings (fingerprint {state.fingerprint}, "
            f"this run {expected_fingerprint}); delete the folder or choose another checkpoint_dir"
        )
    return state


def remove_checkpoints(folder: str | os.PathLike) -> None:
    """Delete a finished run's checkpoints (they exist only to resume an interrupted run)."""
    root = Path(folder)
    for path in [*list_checkpoints(root), *root.glob(".partial-*")]:
        shutil.rmtree(path, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # not empty (the user keeps other files there) or already gone
        pass
