"""Writes that are complete or absent, and that never replace what frugalm did not write.

Everything frugalm writes for a user to load later (artifacts, exports, reports, the default
model's build) goes through these helpers: write beside the target, then rename over it (a
rename within one folder is atomic on POSIX file systems). A folder is replaced only when
frugalm wrote it (it holds `frugalm.json` or frugalm's ownership mark) or it is empty, unless
the caller passes `force`; a symlink is never followed into its target. A write killed midway
leaves a `.NAME.partial-PID-*` folder (or, between its two renames, `.NAME.old-PID`); the next
write of the same folder sweeps those whose process is gone, restoring the old folder when the
new one never arrived.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from frugalm.errors import ConfigError

OWNER_MARK = ".frugalm-written"
"""An empty file in each folder frugalm writes whole without a file of its own in it (exports):
the proof that it may replace it."""
OWNED_BY = (OWNER_MARK, "frugalm.json", "frugalm_build.json")  # variants; the default model's build
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(-.*)?")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a sibling temporary file renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_folder(
    out_dir: str | os.PathLike, *, force: bool = False, owned_by: tuple[str, ...] = OWNED_BY, flag: str = "--force"
) -> Path:
    """The absolute output folder, after refusing what must not be written over.

    Refused: a symlink (never followed into its target), a file, and an existing non-empty
    folder holding none of `owned_by` (frugalm did not write it) unless `force`.
    """
    given = Path(out_dir).expanduser()
    if given.is_symlink():
        raise ConfigError(
            f"output folder '{given}' is a symlink; frugalm does not write through links: pass the real folder path"
        )
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path '{out}' is a file; pass a folder path")
    if not force and out.is_dir() and not any((out / mark).exists() for mark in owned_by) and any(out.iterdir()):
        raise ConfigError(
            f"output folder '{out}' exists and was not written by frugalm; choose a new or empty folder, or pass {flag} to replace it"
        )
    return out


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """A sibling temporary folder to write into; renamed to `out_dir` once the block succeeds.

    An existing folder is replaced only once the new one is complete, and only if frugalm wrote
    it (see check_output_folder; `force` lifts that); on any error the temporary folder is
    removed, so `out_dir` is always complete or absent (or the old one). The new folder gets
    frugalm's ownership mark and the usual umask modes (mkdtemp and safetensors create
    owner-only entries).
    """
    out = check_output_folder(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if not any((tmp / mark).exists() for mark in OWNED_BY):  # frugalm.json and the like already say whose it is
            (tmp / OWNER_MARK).touch()
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
        if out.exists():  # a folder cannot be renamed over a non-empty one: move the old aside
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove what killed writes of `out` left beside it; restore `out` from an old copy if it is missing.

    Only entries named by atomic_folder (`.NAME.partial-PID-*`, `.NAME.old-PID`) whose process
    no longer runs are touched. Returns what was removed or restored.
    """
    touched = []
    for path in sorted(out.parent.glob(f".{glob_escape(out.name)}.*")):
        m = _LEFTOVER.fullmatch(path.name)
        if (
            not m
            or m["name"] != out.name
            or not path.is_dir()
            or path.is_symlink()
            or int(m["pid"]) == os.getpid()
            or process_alive(int(m["pid"]))
        ):
            continue
        if (
            m["kind"] == "old" and not out.exists()
        ):  # killed between its two renames: the old folder is the complete one
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)
        touched.append(path)
    return touched


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs (a pid reused by another process counts as alive: the safe side)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
