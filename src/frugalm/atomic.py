"""Writes that are complete or absent: a crash, a SIGKILL or a full disk never leaves half a file.

Everything frugalm writes for a user to load later (artifacts, reports, the default model's
build) goes through these two helpers: write beside the target, then rename over it (a rename
within one folder is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from frugalm.errors import ConfigError


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


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A sibling temporary folder to write into; renamed to `out_dir` once the block succeeds.

    An existing folder is replaced only once the new one is complete; on any error the
    temporary folder is removed, so `out_dir` is always complete or absent (or the old one).
    The new folder and its files get the usual umask modes (mkdtemp and safetensors create
    owner-only entries).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path '{out}' is a file; pass a folder path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
