"""Reading evaluation and training text: one checked entry point, documents, seeded noise."""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from frugalm.errors import DataError

DOC_SEPARATOR = "<|endoftext|>"
"""A line holding only this string ends a document (the TinyStories convention)."""


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, refusing missing, unreadable, empty and binary files with the fix.

    Reads the whole file into memory: for text that is used whole (calibration, training). The
    benchmark checks its text with check_text_file and reads it with iter_documents instead.
    """
    p = _existing_file(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if b"\x00" in raw[:_BINARY_SNIFF_BYTES]:
        raise _binary(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc.start) from None
    if not text.strip():
        raise _empty(path)
    return text


def check_text_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Refuse what read_text refuses, reading the file as a stream; return the SHA-256 of its bytes.

    Memory stays O(chunk_bytes) whatever the file's size. The hash equals that of the text
    read_text returns, encoded as UTF-8 (decoding valid UTF-8 and encoding it back is exact).
    """
    p = _existing_file(path)
    digest, decoder, has_text, offset = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), False, 0
    try:
        with p.open("rb") as f:
            if b"\x00" in f.read(_BINARY_SNIFF_BYTES):
                raise _binary(path)
            f.seek(0)
            while True:
                chunk = f.read(chunk_bytes)
                digest.update(chunk)
                held = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
                try:
                    has_text = bool(decoder.decode(chunk, final=not chunk).strip()) or has_text
                except UnicodeDecodeError as exc:
                    raise _not_utf8(path, offset - held + exc.start) from None
                if not chunk:
                    break
                offset += len(chunk)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not has_text:
        raise _empty(path)
    return digest.hexdigest()


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


def iter_documents(
    path: str | os.PathLike, max_doc_chars: int | None = None, *, chunk_bytes: int = 1 << 20
) -> Iterator[tuple[str, bool]]:
    """Yield (document, complete) from a text file (checked with check_text_file), read as a stream.

    The documents are exactly split_documents(read_text(path)). With `max_doc_chars`, a document
    that reaches that many characters is yielded as its (stripped) prefix with complete=False and
    reading stops there: a caller that caps documents wants nothing after one it had to cut. Memory
    is then O(max_doc_chars + chunk_bytes), whatever the size of the file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    doc: list[str] = []  # the lines of the document being read
    tail: list[str] = []  # pieces of the line not ended yet (a line can span many chunks)
    doc_chars = tail_chars = 0
    with open(Path(path).expanduser(), "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                new = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:  # changed since it was checked
                raise _not_utf8(path, exc.start) from None
            if chunk and not _has_line_break(new):
                tail.append(new)
                tail_chars += len(new)
            else:  # re-split the unended line with the new text: "\r" + "\n" is one line break
                lines = ("".join(tail) + new).splitlines(keepends=True)
                tail = [lines.pop()] if chunk and lines else []
                tail_chars = len(tail[0]) if tail else 0
                for line in lines:
                    if line.strip() != DOC_SEPARATOR:
                        doc.append(line)
                        doc_chars += len(line)
                        continue
                    if text := "".join(doc).strip():
                        yield text, True
                    doc, doc_chars = [], 0
            if max_doc_chars is not None and doc_chars + tail_chars >= max_doc_chars:
                yield ("".join(doc) + "".join(tail))[:max_doc_chars].strip(), False
                return
            if not chunk:
                break
    if text := "".join(doc).strip():
        yield text, True


def _has_line_break(text: str) -> bool:
    lines = text.splitlines()  # str.splitlines knows more line breaks than "\n" and "\r"
    return len(lines) > 1 or (bool(lines) and lines[0] != text)


_BINARY_SNIFF_BYTES = 1 << 20
"""A NUL byte in this many leading bytes marks a file as binary."""


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"text file '{path}' does not exist; pass an existing UTF-8 text file with --data")
    if p.is_dir():
        raise DataError(f"text path '{path}' is a folder; pass a UTF-8 text file with --data")
    return p


def _unreadable(path, exc: OSError) -> DataError:
    return DataError(f"text file '{path}' cannot be read ({exc.strerror}); check its permissions")


def _binary(path) -> DataError:
    return DataError(f"text file '{path}' is binary (it holds NUL bytes); pass a UTF-8 text file")


def _not_utf8(path, byte: int) -> DataError:
    return DataError(f"text file '{path}' is not valid UTF-8 (byte {byte}); convert it, e.g. `iconv -t utf-8`")


def _empty(path) -> DataError:
    return DataError(f"text file '{path}' is empty; pass a file with text to evaluate on")
