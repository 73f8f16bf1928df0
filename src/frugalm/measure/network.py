"""Network: the bytes it takes to ship the model artifact, raw and compressed.

Compression is zlib at level 6 (the gzip default), streamed over every file of the folder in
sorted order: what `tar | gzip` would send, less the tar headers. Floating-point weights
compress little; packed low-bit weights and sparse (zeroed) weights compress much more.
"""

from __future__ import annotations

import zlib
from pathlib import Path

CHUNK = 1 << 22


def artifact_files(folder: Path) -> list[Path]:
    return [f for f in sorted(Path(folder).rglob("*")) if f.is_file()]


def compressed_bytes(folder: Path, level: int = 6) -> int:
    total = 0
    for path in artifact_files(folder):
        comp = zlib.compressobj(level)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                total += len(comp.compress(chunk))
        total += len(comp.flush())
    return total
