"""Measure a model in a fresh child process, with a timeout, and get typed messages back.

The child (`python -m frugalm.benchmark.runner SPEC FD`) writes JSON lines to a dedicated pipe:
`{"progress": [step, done, total]}` while it works, then exactly one `{"ok": ...}` or
`{"error": ...}`. The parent blocks on that pipe with a deadline (no spinning), kills the child
when the deadline passes, and treats an end of the pipe without a final message as a crash.
The child's stdout and stderr go to a log whose tail is shown if it fails. The child dies with
its parent (PR_SET_PDEATHSIG), so a killed parent leaves no orphan measuring in the background.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import transformers

from frugalm import errors
from frugalm.atomic import process_alive
from frugalm.benchmark.child import BenchSpec, environment, measure_model
from frugalm.errors import FrugalmError, MeasurementError

Progress = Callable[[str, int, int], None]


class ChildCrash(MeasurementError):
    """The measuring child died, timed out, or hit a bug; the run is recorded as failed."""


class _Child:
    """One measuring child: started at once (its interpreter imports torch and transformers),
    then given exactly one spec. Its spec file and log live in a temporary folder of its own."""

    def __init__(self):
        sweep_stale_child_folders()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{CHILD_TMP_PREFIX}{os.getpid()}-")
        self.spec_path, self.log_path = Path(self._tmp.name) / "spec.json", Path(self._tmp.name) / "child.log"
        self.read_fd, write_fd = os.pipe()
        self.log_tail = ""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "frugalm.benchmark.runner", str(self.spec_path), str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.PIPE, stdout=log, stderr=log,
                env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"},
            )  # fmt: skip
        os.close(write_fd)

    def run(self, spec, timeout_s: float, progress: Progress | None) -> dict:
        try:
            self.spec_path.write_text(json.dumps(asdict(spec)))
            try:
                self.proc.stdin.write(b"go\n")  # the child reads the spec only now
                self.proc.stdin.close()
            except BrokenPipeError:
                pass  # it died while waiting: the pipe's end says so below
            message, timed_out = _wait_for_result(self.proc, self.read_fd, time.monotonic() + timeout_s, progress)
        finally:
            self.close()
        if message is None:
            raise ChildCrash(_crash_message(self.proc.returncode, timed_out, timeout_s, self.log_tail))
        if "error" in message:
            raise _rebuild_error(message["error"])
        return message["ok"]

    def close(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log_tail = read_tail(self.log_path, LOG_TAIL_CHARS)
        self._tmp.cleanup()


CHILD_TMP_PREFIX = "frugalm-child-"
"""A child's temporary folder is named CHILD_TMP_PREFIX + the parent's pid + a random suffix."""


def sweep_stale_child_folders() -> None:
    """Remove child folders (spec with evaluation text, log) left in the temp folder by a killed parent."""
    for folder in Path(tempfile.gettempdir()).glob(f"{CHILD_TMP_PREFIX}*-*"):
        pid = folder.name[len(CHILD_TMP_PREFIX) :].split("-", 1)[0]
        if (
            pid.isdigit()
            and int(pid) != os.getpid()
            and not folder.is_symlink()
            and folder.is_dir()
            and not process_alive(int(pid))
        ):
            shutil.rmtree(folder, ignore_errors=True)


LOG_TAIL_CHARS = 4000
"""Characters of the child's log kept to explain a crash."""


def read_tail(path: Path, max_chars: int) -> str:
    """The last `max_chars` characters of a UTF-8 log ("" when absent), read from its end.

    A child can log without bound; only the last 4 * max_chars bytes (UTF-8 takes at most 4
    per character) are read. A character cut at that start decodes as U+FFFD.
    """
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4 * max_chars))
            return f.read().decode("utf-8", errors="replace")[-max_chars:]
    except FileNotFoundError:
        return ""


_spare: _Child | None = None  # started ahead while warm_children() is active


@contextlib.contextmanager
def warm_children():
    """Keep one measuring child started ahead of need.

    A fresh interpreter spends ~5 s importing torch and transformers. Inside this context the
    next child is started as soon as one finishes, so its imports overlap the parent's work on
    the next variant (applying a recipe, saving it) rather than adding to it. No measurement
    overlaps: a child measures only once the parent hands it a spec and waits.
    """
    global _spare
    _spare = _Child()
    try:
        yield
    finally:
        spare, _spare = _spare, None
        if spare is not None:
            spare.close()


def run_child(spec, *, timeout_s: float, progress: Progress | None = None) -> dict:
    """Run the benchmark of `spec` (a BenchSpec) in a fresh interpreter; return its `ok` payload."""
    global _spare
    child, warm, _spare = _spare, _spare is not None, None
    if child is None or child.proc.poll() is not None:  # none started ahead, or it died waiting
        if child is not None:
            child.close()
        child = _Child()
    try:
        return child.run(spec, timeout_s, progress)
    finally:
        if warm:
            _spare = _Child()


def _wait_for_result(proc, fd: int, deadline: float, progress: Progress | None) -> tuple[dict | None, bool]:
    """Read JSON lines until the final message, EOF (child gone) or the deadline (timed out)."""
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not sel.select(timeout=remaining):
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None, False
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "progress" in msg:
                    if progress:
                        progress(*msg["progress"])
                else:
                    return msg, False
    proc.kill()
    return None, True


def _crash_message(code: int | None, timed_out: bool, timeout_s: float, log: str) -> str:
    if timed_out:
        return f"measuring took longer than the timeout ({timeout_s:.0f} s) and was stopped; raise --timeout or measure fewer workloads"
    how = f"was killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
    if code == -signal.SIGKILL:
        how += " (out of memory?)"
    tail = " | ".join(log.strip().splitlines()[-3:])
    return f"the measuring child process {how} before finishing{'; last output: ' + tail if tail else ''}"


def _rebuild_error(err: dict) -> Exception:
    """A user error from the child becomes the same FrugalmError here; a bug keeps its traceback."""
    if err["kind"] == "user":
        cls = getattr(errors, err["type"], FrugalmError)
        return (
            cls(err["message"])
            if isinstance(cls, type) and issubclass(cls, FrugalmError)
            else FrugalmError(err["message"])
        )
    return ChildCrash(f"bug in the measuring child ({err['type']}: {err['message']}); traceback:\n{err['traceback']}")


# --- child side ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def child_main(spec_path: str, fd: int) -> None:
    _die_with_parent()
    out = os.fdopen(fd, "w", buffering=1)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")

    try:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if not sys.stdin.readline():  # started ahead (warm_children) and closed unused
            return
        spec = BenchSpec(**json.loads(Path(spec_path).read_text()))
        Path(spec_path).unlink()  # it holds the evaluation text: gone as soon as it is read
        emit = lambda step, done, total: send({"progress": [step, done, total]})  # noqa: E731
        measurements, baseline = measure_model(spec, emit)
        send(
            {
                "ok": {
                    "measurements": [m.to_dict() for m in measurements],
                    "environment": environment(spec.device),
                    "baseline_rss_bytes": baseline,
                    "reference_scores": spec.reference_scores,
                }
            }
        )
    except FrugalmError as exc:
        send({"error": {"kind": "user", "type": type(exc).__name__, "message": str(exc)}})
    except Exception as exc:  # a bug: report it with its traceback rather than dying silently
        send(
            {
                "error": {
                    "kind": "bug",
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                }
            }
        )
    finally:
        out.close()


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]))
