"""Atomic training checkpoints: a run killed at any moment resumes from its last complete one.

A checkpoint is a folder `step-00000120/` holding one `state.pt`: the model's state dict, the
optimizer's state, the step reached, the loss curve so far, and every random state the loop
draws from (the window-sampling generator, torch's CPU and CUDA generators). It is written into
a hidden temporary folder, flushed to disk, and renamed into place; a rename is atomic on POSIX,
so a folder named `step-*` is always complete and a killed write leaves only a `.partial-*`
folder, which is never loaded and is swept on the next save.

Each checkpoint carries the fingerprint of the run's settings, in `state.pt` and in a small
`fingerprint.json` beside it; resuming with other settings is refused (the weights would silently
mix two runs). The fingerprint is read first, from the JSON file, and `state.pt` is then loaded
with `torch.load(weights_only=True)`: tensors and plain values only, so a pickle planted in a
checkpoint folder cannot run code; one that is not plain data is refused with the fix (delete the
folder). A checkpoint written before fingerprint.json existed is still resumed: its state.pt is
loaded the same safe way and its fingerprint checked there.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch

from frugalm.errors import ConfigError

_NAME = re.compile(r"^step-(\d{8})$")
_FINGERPRINT = "fingerprint.json"


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
    energy_j: float | None = None
    """Energy spent from step energy_from_step up to this checkpoint; None in checkpoints written before it was stored."""
    energy_method: str | None = None
    """'measured' when every segment read a hardware counter, else 'estimated'."""
    energy_from_step: int = 0
    """The first step energy_j covers (above 0 when the run resumed from a checkpoint without energy)."""


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
        with open(tmp / _FINGERPRINT, "w") as f:
            json.dump({"fingerprint": state.fingerprint}, f)
            f.flush()
            os.fsync(f.fileno())
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
    """The newest complete checkpoint in `folder`, or None; refuses one from other settings.

    The fingerprint is checked before state.pt is read, and state.pt is read as plain data only.
    """
    if folder is None:
        return None
    found = list_checkpoints(folder)
    if not found:
        return None
    path = found[-1]
    stored = _stored_fingerprint(path)
    if stored is not None:
        _check_fingerprint(folder, stored, expected_fingerprint)
    raw = _read_state(path / "state.pt", folder)
    _check_fingerprint(folder, raw["fingerprint"], expected_fingerprint)
    return TrainState(**raw)


def _stored_fingerprint(checkpoint: Path) -> str | None:
    """The fingerprint in checkpoint/fingerprint.json; None for a checkpoint written before that file existed."""
    path = checkpoint / _FINGERPRINT
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        value = None
    if not isinstance(value, str):
        raise ConfigError(
            f"checkpoint '{path}' is not a fingerprint frugalm wrote; delete the checkpoint folder '{checkpoint.parent}' (the stage then trains from the start)"
        )
    return value


def _check_fingerprint(folder, stored: str, expected: str) -> None:
    if stored != expected:
        raise ConfigError(
            f"checkpoint folder '{folder}' holds a run with other settings (fingerprint {stored}, "
            f"this run {expected}); delete the folder or choose another checkpoint_dir"
        )


_STATE_FIELDS = {f.name for f in fields(TrainState)}
_REQUIRED_FIELDS = {f.name for f in fields(TrainState) if f.default is MISSING}


def _read_state(path: Path, folder) -> dict:
    """state.pt as a dict of TrainState's fields, loaded with weights_only=True (runs no code)."""
    fix = f"delete the checkpoint folder '{folder}' (the stage then trains from the start)"
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"checkpoint '{path}' is not plain training state (tensors and plain values) and was not loaded ({reason}); {fix}"
        ) from None
    if (
        not isinstance(raw, dict)
        or not _REQUIRED_FIELDS <= raw.keys()
        or not raw.keys() <= _STATE_FIELDS
        or not isinstance(raw["fingerprint"], str)
    ):
        raise ConfigError(f"checkpoint '{path}' does not hold the training state frugalm writes; {fix}")
    return raw


def remove_checkpoints(folder: str | os.PathLike) -> None:
    """Delete a finished run's checkpoints (they exist only to resume an interrupted run)."""
    root = Path(folder)
    for path in [*list_checkpoints(root), *root.glob(".partial-*")]:
        shutil.rmtree(path, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # not empty (the user keeps other files there) or already gone
        pass
