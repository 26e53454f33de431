"""Cut an image directory into fixed-size, SHA-256-named chunks, hashing in threads.

All-zero chunks are recorded as `ZERO_CHUNK` and never stored. Reads files only; no store I/O.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.core.errors import SnapscaleError
from snapscale.workload.record import ChunkRange

# 8 MiB: see docs/store.md ("Chunk size") for the measurement behind it.
DEFAULT_CHUNK_BYTES = 8 << 20
ZERO_CHUNK = "zero"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_ZEROS = bytes(DEFAULT_CHUNK_BYTES)


class ImageError(SnapscaleError):
    """An image directory holds something a checkpoint cannot carry (a symlink, a device, ...)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"image {path}: {reason}")
        self.path = path
        self.reason = reason


def is_digest(s: str) -> bool:
    return _DIGEST_RE.fullmatch(s) is not None


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def is_zero(data: bytes) -> bool:
    # Comparing against a zero buffer is a memcmp (~13 GB/s here); counting bytes is 7x slower.
    step = len(_ZEROS)
    for off in range(0, len(data), step):
        piece = data[off : off + step] if len(data) > step else data
        if piece != _ZEROS[: len(piece)]:
            return False
    return True


def chunk_count(size: int, chunk_bytes: int) -> int:
    return (size + chunk_bytes - 1) // chunk_bytes


def chunk_length(size: int, chunk_bytes: int, index: int) -> int:
    """Length of chunk `index` of a file of `size` bytes (the last one may be short)."""
    return min(chunk_bytes, size - index * chunk_bytes)


@dataclass(frozen=True)
class ScannedFile:
    path: str  # relative, '/'-separated
    size: int
    mode: int  # permission bits only
    chunks: list[str]  # digests or ZERO_CHUNK, one per chunk_bytes of the file


@dataclass(frozen=True)
class ImageScan:
    chunk_bytes: int
    files: list[ScannedFile]
    sources: dict[str, ChunkRange]  # one place to read each distinct non-zero chunk

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def unique_bytes(self) -> int:
        return sum(s.length for s in self.sources.values())

    @property
    def zero_bytes(self) -> int:
        n = 0
        for f in self.files:
            for i, c in enumerate(f.chunks):
                if c == ZERO_CHUNK:
                    n += chunk_length(f.size, self.chunk_bytes, i)
        return n


def walk_image(image_dir: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Regular files under `image_dir` as (relative path, path, lstat), sorted; refuses anything else."""
    for root, dirs, files in os.walk(image_dir, followlinks=False):
        dirs.sort()
        for name in dirs:
            p = Path(root) / name
            if p.is_symlink():
                raise ImageError(str(p.relative_to(image_dir)), "is a symlink; a checkpoint carries none")
        for name in sorted(files):
            p = Path(root) / name
            st = p.lstat()
            rel = p.relative_to(image_dir).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise ImageError(rel, "is a symlink; a checkpoint carries none")
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(rel, "is not a regular file")
            yield rel, p, st


def read_chunk(source: ChunkRange) -> bytes:
    fd = os.open(source.path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(fd, source.length, source.offset)
    finally:
        os.close(fd)
    if len(data) != source.length:
        raise ImageError(
            str(source.path), f"shrank while reading (wanted {source.length} at {source.offset})"
        )
    return data


def _hash_one(source: ChunkRange) -> str:
    data = read_chunk(source)
    return ZERO_CHUNK if is_zero(data) else sha256_hex(data)


def scan_image(
    image_dir: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, workers: int | None = None
) -> ImageScan:
    """Chunk and hash every regular file under `image_dir`. Blocking: call it from a thread."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if not image_dir.is_dir():
        raise ImageError(str(image_dir), "is not a directory")
    entries = list(walk_image(image_dir))
    jobs: list[ChunkRange] = []
    for _rel, p, st in entries:
        for i in range(chunk_count(st.st_size, chunk_bytes)):
            jobs.append(ChunkRange(str(p), i * chunk_bytes, chunk_length(st.st_size, chunk_bytes, i)))
    # hashlib releases the GIL for large buffers, so threads hash on every core.
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) + 1)) as pool:
        digests = list(pool.map(_hash_one, jobs))
    files: list[ScannedFile] = []
    sources: dict[str, ChunkRange] = {}
    k = 0
    for rel, _p, st in entries:
        n = chunk_count(st.st_size, chunk_bytes)
        chunks = digests[k : k + n]
        for j, d in enumerate(chunks):
            if d != ZERO_CHUNK:
                sources.setdefault(d, jobs[k + j])
        k += n
        files.append(ScannedFile(rel, st.st_size, stat.S_IMODE(st.st_mode), chunks))
    return ImageScan(chunk_bytes, files, sources)
