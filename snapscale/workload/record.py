"""The weights record: which content-addressed chunks, from which file ranges, back which tensor of
a workload's weights arena, and where that arena sits in the process's address space.

The workload writes it before a freeze (its weights' memory released, their addresses kept); the
engine keeps it in the image dir, the freezer uploads its chunks from the source files, the
restorer prefetches them, and the workload reads it again to fill the arena after a restore.
Chunks are cut per tensor, from the tensor's first byte, so two files holding the same tensor
(another deployment of the same base model, a file with another header) share its chunks.
Pure and standard library only: the sandbox imports it without the rest of snapscale.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from snapscale.workload.errors import WeightsError
from snapscale.workload.stfile import DTYPE_BYTES

FORMAT = 1
IMAGE_FILE = "snapscale-weights.json"  # the record's name in an image dir (CRIU ignores it)
ZERO_CHUNK = "zero"  # the store's name for an all-zero chunk: never stored, filled with zeros
DEFAULT_CHUNK_BYTES = 8 << 20  # the store's default chunk size (docs/store.md)
ALIGN = 512  # tensor offsets in the arena: what torch's caching allocator gives its blocks
ARENA_KINDS = ("cuda-vmm", "host")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def pieces(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a tensor of `nbytes`: the last one may be short. Pure."""
    return [(o, min(chunk_bytes, nbytes - o)) for o in range(0, nbytes, chunk_bytes)]


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(sizes: list[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Arena offsets for tensors of these sizes, in order, each aligned; and the bytes they span."""
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at = round_up(at + n, align)
    return offsets, at


@dataclass(frozen=True)
class ArenaInfo:
    kind: str  # "cuda-vmm" (GPU memory mapped into a reserved range) or "host" (an mmap'd range)
    device: str  # "cuda:0", "cpu"
    va: int  # first address of the reserved range, the same after a restore
    size: int


@dataclass(frozen=True)
class SourceFile:
    path: str  # as the workload opened it; the host sees the sandbox's files at the same paths
    size: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # in the arena
    nbytes: int
    file: int  # index into WeightsRecord.files
    file_offset: int  # absolute offset of the tensor's first byte in that file
    chunks: tuple[str, ...]  # sha256 hex or ZERO_CHUNK, one per chunk_bytes of the tensor


@dataclass(frozen=True)
class ChunkRange:
    """Where a chunk's bytes can be read: `length` bytes at `offset` of `path`."""

    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class WeightsRecord:
    format: int
    chunk_bytes: int
    arena: ArenaInfo
    files: tuple[SourceFile, ...]
    tensors: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def chunk_sizes(self) -> dict[str, int]:
        """Each distinct non-zero chunk's length."""
        out: dict[str, int] = {}
        for t in self.tensors:
            for d, (_, n) in zip(t.chunks, pieces(t.nbytes, self.chunk_bytes), strict=True):
                if d != ZERO_CHUNK:
                    out.setdefault(d, n)
        return out

    def sources(self) -> dict[str, ChunkRange]:
        """One file range to read each distinct non-zero chunk from (the freezer uploads from it)."""
        out: dict[str, ChunkRange] = {}
        for t in self.tensors:
            path = self.files[t.file].path
            for d, (o, n) in zip(t.chunks, pieces(t.nbytes, self.chunk_bytes), strict=True):
                if d != ZERO_CHUNK and d not in out:
                    out[d] = ChunkRange(path, t.file_offset + o, n)
        return out

    def to_plain(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["tensors"]:
            t["shape"], t["chunks"] = list(t["shape"]), list(t["chunks"])
        d["files"] = list(d["files"])
        d["tensors"] = list(d["tensors"])
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_plain(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "weights") -> WeightsRecord:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise WeightsError(where, f"not JSON: {e}") from None
        return cls.from_plain(doc, where)

    @classmethod
    def from_plain(cls, doc: Any, where: str = "weights") -> WeightsRecord:
        """Decode and check a record; anything wrong is a `WeightsError` naming the field."""
        d = _obj(doc, where)
        fmt = _int(d, "format", where)
        if fmt != FORMAT:
            raise WeightsError(f"{where}.format", f"{fmt} is not a format this library reads ({FORMAT})")
        chunk_bytes = _int(d, "chunk_bytes", where, low=1)
        a = _obj(d.get("arena"), f"{where}.arena")
        kind = _str(a, "kind", f"{where}.arena")
        if kind not in ARENA_KINDS:
            raise WeightsError(f"{where}.arena.kind", f"must be one of {list(ARENA_KINDS)}, got {kind!r}")
        arena = ArenaInfo(
            kind, _str(a, "device", f"{where}.arena"), _int(a, "va", f"{where}.arena", low=1),
            _int(a, "size", f"{where}.arena", low=1),
        )  # fmt: skip
        files = tuple(
            SourceFile(_str(f, "path", p), _int(f, "size", p, low=0)) for p, f in _items(d, "files", where)
        )
        tensors = tuple(_tensor(t, p, len(files)) for p, t in _items(d, "tensors", where))
        rec = cls(fmt, chunk_bytes, arena, files, tensors)
        check(rec, where)
        return rec


def _tensor(t: dict[str, Any], p: str, nfiles: int) -> TensorEntry:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
        raise WeightsError(f"{p}.shape", f"expected a list of non-negative integers, got {shape!r}")
    chunks = t.get("chunks")
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise WeightsError(f"{p}.chunks", "expected a list of digests")
    return TensorEntry(
        _str(t, "name", p), _str(t, "dtype", p), tuple(shape), _int(t, "offset", p, low=0),
        _int(t, "nbytes", p, low=0), _int(t, "file", p, low=0, high=nfiles - 1),
        _int(t, "file_offset", p, low=0), tuple(chunks),
    )  # fmt: skip


def check(rec: WeightsRecord, where: str = "weights") -> None:
    """What makes a record safe to fill an arena from: every tensor inside the arena and its file,
    none overlapping another, dtype and shape that give its size, one digest per chunk."""
    seen: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for i, t in enumerate(rec.tensors):
        p = f"{where}.tensors[{i}]"
        if t.name in seen:
            raise WeightsError(f"{p}.name", f"{t.name!r} listed twice")
        seen.add(t.name)
        if t.dtype not in DTYPE_BYTES:
            raise WeightsError(f"{p}.dtype", f"unknown dtype {t.dtype!r}")
        if math.prod(t.shape) * DTYPE_BYTES[t.dtype] != t.nbytes:
            raise WeightsError(f"{p}.nbytes", f"{t.nbytes} is not the size of {t.dtype}{list(t.shape)}")
        if t.offset % DTYPE_BYTES[t.dtype] or t.offset + t.nbytes > rec.arena.size:
            raise WeightsError(f"{p}.offset", f"{t.offset}+{t.nbytes} is misaligned or outside the arena")
        if not 0 <= t.file < len(rec.files):
            raise WeightsError(f"{p}.file", f"{t.file} names no file ({len(rec.files)} listed)")
        if t.file_offset + t.nbytes > rec.files[t.file].size:
            raise WeightsError(f"{p}.file_offset", f"{t.file_offset}+{t.nbytes} is past the file's end")
        want = len(pieces(t.nbytes, rec.chunk_bytes))
        if len(t.chunks) != want:
            raise WeightsError(f"{p}.chunks", f"{len(t.chunks)} digests for {t.nbytes} bytes, want {want}")
        for c in t.chunks:
            if c != ZERO_CHUNK and not _DIGEST.fullmatch(c):
                raise WeightsError(f"{p}.chunks", f"{c!r} is not a sha256 digest")
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise WeightsError(f"{where}.tensors", f"{b!r} overlaps {a!r} in the arena")


@dataclass(frozen=True)
class Segment:
    """One piece of a fill: `length` bytes to arena offset `dst`, read at `src` of `path` (None:
    zeros); with `digest`, the bytes read must hash to it."""

    dst: int
    length: int
    path: str | None = None
    src: int = 0
    digest: str | None = None


def chunk_plan(rec: WeightsRecord, chunk_path: Callable[[str], str]) -> list[Segment]:
    """Fill from whole chunk files named by digest (the host cache, which verified them)."""
    out: list[Segment] = []
    for t in rec.tensors:
        for d, (o, n) in zip(t.chunks, pieces(t.nbytes, rec.chunk_bytes), strict=True):
            at = t.offset + o
            out.append(Segment(at, n) if d == ZERO_CHUNK else Segment(at, n, chunk_path(d)))
    return out


def file_plan(rec: WeightsRecord, *, verify: bool) -> list[Segment]:
    """Fill from the source files the record names; with `verify` every chunk is hashed on the way
    (a file replaced since the record was taken fails instead of serving other weights)."""
    out: list[Segment] = []
    for t in rec.tensors:
        path = rec.files[t.file].path
        for d, (o, n) in zip(t.chunks, pieces(t.nbytes, rec.chunk_bytes), strict=True):
            if d == ZERO_CHUNK and not verify:
                out.append(Segment(t.offset + o, n))
            else:
                out.append(Segment(t.offset + o, n, path, t.file_offset + o, d if verify else None))
    return out


def _obj(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise WeightsError(where, f"expected an object, got {type(v).__name__}")
    return v


def _items(d: dict[str, Any], key: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    v = d.get(key)
    if not isinstance(v, list):
        why = "missing" if v is None else f"expected a list, got {type(v).__name__}"
        raise WeightsError(f"{where}.{key}", why)
    return [(f"{where}.{key}[{i}]", _obj(x, f"{where}.{key}[{i}]")) for i, x in enumerate(v)]


def _int(d: dict[str, Any], key: str, where: str, *, low: int | None = None, high: int | None = None) -> int:
    v = d.get(key)
    if type(v) is not int:
        raise WeightsError(f"{where}.{key}", "missing" if v is None else f"expected an integer, got {v!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        raise WeightsError(f"{where}.{key}", f"{v} is out of range [{low}, {high}]")
    return v


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        why = "missing" if v is None else f"expected a non-empty string, got {v!r}"
        raise WeightsError(f"{where}.{key}", why)
    return v
