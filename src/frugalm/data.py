"""Reading evaluation and training text: one checked entry point, documents, seeded noise."""

from __future__ import annotations

import os
import random
import string
from pathlib import Path

from frugalm.errors import DataError

DOC_SEPARATOR = "<|endoftext|>"
"""A line holding only this string ends a document (the TinyStories convention)."""


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, refusing missing, unreadable, empty and binary files with the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"text file '{path}' does not exist; pass an existing UTF-8 text file with --data")
    if p.is_dir():
        raise DataError(f"text path '{path}' is a folder; pass a UTF-8 text file with --data")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"text file '{path}' cannot be read ({exc.strerror}); check its permissions") from None
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"text file '{path}' is binary (it holds NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file '{path}' is not valid UTF-8 (byte {exc.start}); convert it, e.g. `iconv -t utf-8`") from None
    if not text.strip():
        raise DataError(f"text file '{path}' is empty; pass a file with text to evaluate on")
    return text


def split_documents(text: str) -> list[str]:
    """Split at lines holding only DOC_SEPARATOR; a text without one is a single document."""
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip() == DOC_SEPARATOR:
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    docs = [d.strip() for d in docs]
    return [d for d in docs if d]


NOISE_OPS = ("substitute", "delete", "insert", "swap")


def add_char_noise(text: str, rate: float, seed: int) -> str:
    """Perturb each non-space character with probability `rate` by one seeded edit.

    The edit is drawn uniformly from NOISE_OPS; inserted and substituted characters are ASCII
    letters, so insertions and deletions balance and the text keeps about its length.
    """
    rng = random.Random(seed)
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isspace() or rng.random() >= rate:
            out.append(c)
        else:
            op = rng.choice(NOISE_OPS)
            if op == "substitute":
                out.append(rng.choice(string.ascii_letters))
            elif op == "insert":
                out += [c, rng.choice(string.ascii_letters)]
            elif op == "swap" and i + 1 < len(chars):
                out += [chars[i + 1], c]
                i += 1
            elif op == "swap":
                out.append(c)
            # delete: append nothing
        i += 1
    return "".join(out)
