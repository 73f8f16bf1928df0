"""A progress display on stderr: one updating line on a terminal, a line per step otherwise."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(self, stream=None, enabled: bool = True):
        self.stream, self.enabled = stream or sys.stderr, enabled
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_step = None

    def __call__(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        text = f"[{elapsed:6.1f} s] {step}: {done}/{total}"
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif step != self.last_step or done == total:
            self.stream.write(text + "\n")
        self.last_step = step

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
