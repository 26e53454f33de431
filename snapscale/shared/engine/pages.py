"""CRIU's memory images: the magic-headed protobuf files, `mm-<pid>.img`'s VMAs and
`pagemap-<pid>.img`'s entries read and written, and which of an entry's pages may be dropped.

CRIU restores a private anonymous page that has no pagemap entry as a zero page: the mapping is
fresh, and where a child inherited its parent's copy CRIU drops it (`MADV_DONTNEED`, criu/mem.c
`restore_priv_vma_content`). File-backed private pages are not droppable: without an entry CRIU
would restore the file's bytes there. Shared memory (`pagemap-shmem-*`), lazy or parent-image
entries are left as they are. `zeropages.py` drops them; `tcpimg.py` reads images here too.

Pure parsing and planning. The three protobuf messages go through `protowire`, as CRIU's stats
images do in `criu.py`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.core.errors import SnapscaleError
from snapscale.shared.engine import protowire as pw

PAGE = 4096

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
MM_MAGIC = 0x57492820

PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

VMA_AREA_REGULAR = 1 << 0
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_VVAR = 1 << 12
VMA_AREA_MEMFD = 1 << 14
_NOT_PLAIN_ANON = (
    VMA_AREA_VSYSCALL | VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_FILE_PRIVATE | VMA_FILE_SHARED
    | VMA_ANON_SHARED | VMA_AREA_MEMFD
)  # fmt: skip


class CriuImageError(SnapscaleError):
    """A CRIU image file is not what its name says (bad magic, truncated, unknown field type)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"CRIU image {path}: {reason}")
        self.path = path
        self.reason = reason


def read_messages(path: Path, magic: int) -> tuple[bytes, list[bytes]]:
    """The magic header and the size-prefixed messages of a CRIU protobuf image."""
    data = path.read_bytes()
    if len(data) < 8:
        raise CriuImageError(path.name, "shorter than its magic")
    m0, m1 = struct.unpack_from("<II", data)
    if m0 != IMG_COMMON_MAGIC or m1 != magic:
        raise CriuImageError(path.name, f"magic {m0:#x} {m1:#x}, expected {IMG_COMMON_MAGIC:#x} {magic:#x}")
    msgs: list[bytes] = []
    pos = 8
    while pos < len(data):
        if pos + 4 > len(data):
            raise CriuImageError(path.name, "truncated size prefix")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise CriuImageError(path.name, "truncated message")
        msgs.append(data[pos : pos + n])
        pos += n
    return data[:8], msgs


# -- the two images we read --


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    status: int

    @property
    def plain_anon(self) -> bool:
        """Anonymous private memory, where a missing page restores as zeros."""
        s = self.status
        return bool(s & VMA_AREA_REGULAR and s & VMA_ANON_PRIVATE) and not s & _NOT_PLAIN_ANON


@dataclass(frozen=True)
class PagemapEntry:
    vaddr: int
    nr_pages: int
    flags: int

    def encode(self) -> bytes:
        # compat_nr_pages (2) is required; CRIU writes nr_pages (5) beside it and reads that first.
        return pw.encode_fields(
            [(1, self.vaddr), (2, self.nr_pages & 0xFFFFFFFF), (4, self.flags), (5, self.nr_pages)]
        )


def parse_vmas(path: Path) -> list[Vma]:
    _, msgs = read_messages(path, MM_MAGIC)
    if len(msgs) != 1:
        raise CriuImageError(path.name, f"{len(msgs)} mm entries, expected 1")
    vmas: list[Vma] = []
    try:
        for num, v in pw.fields(msgs[0]):
            if num == 14 and isinstance(v, bytes):
                f = {n: x for n, x in pw.fields(v) if isinstance(x, int)}
                vmas.append(Vma(f.get(1, 0), f.get(2, 0), f.get(7, 0)))
    except ValueError as e:
        raise CriuImageError(path.name, str(e)) from None
    return sorted(vmas, key=lambda a: a.start)


def parse_pagemap(path: Path) -> tuple[bytes, int, list[PagemapEntry]]:
    """(magic header, pages id, entries) of a `pagemap-*.img`."""
    header, msgs = read_messages(path, PAGEMAP_MAGIC)
    if not msgs:
        raise CriuImageError(path.name, "no pagemap head")
    try:
        head = dict(pw.fields(msgs[0]))
        pages_id = head.get(1)
        if not isinstance(pages_id, int):
            raise ValueError("pagemap head without pages_id")
        entries: list[PagemapEntry] = []
        for m in msgs[1:]:
            f = dict(pw.fields(m))
            vaddr, compat, nr = f.get(1), f.get(2), f.get(5, f.get(2))
            if not isinstance(vaddr, int) or not isinstance(compat, int) or not isinstance(nr, int):
                raise ValueError("pagemap entry without vaddr or nr_pages")
            in_parent = f.get(3)
            flags = f.get(4)
            if not isinstance(flags, int):  # an older CRIU: derive them as CRIU does
                flags = PE_PARENT if in_parent else PE_PRESENT
            entries.append(PagemapEntry(vaddr, nr, flags))
    except ValueError as e:
        raise CriuImageError(path.name, str(e)) from None
    return header, pages_id, entries


def encode_pagemap(header: bytes, pages_id: int, entries: list[PagemapEntry]) -> bytes:
    parts = [header]
    for msg in [pw.encode_fields([(1, pages_id)])] + [e.encode() for e in entries]:
        parts += [struct.pack("<I", len(msg)), msg]
    return b"".join(parts)


# -- planning (pure) --


def droppable_spans(entry: PagemapEntry, vmas: list[Vma]) -> list[tuple[int, int]]:
    """Page ranges [first, last) of `entry` (0 = its first page) whose zeros may be dropped."""
    if entry.flags & PE_PARENT or not entry.flags & PE_PRESENT:
        return []
    lo, hi = entry.vaddr, entry.vaddr + entry.nr_pages * PAGE
    spans: list[tuple[int, int]] = []
    for v in vmas:
        if v.end <= lo or v.start >= hi or not v.plain_anon:
            continue
        a, b = max(lo, v.start), min(hi, v.end)
        spans.append(((a - lo) // PAGE, (b - lo) // PAGE))
    return spans


def split_entry(entry: PagemapEntry, zero_pages: list[tuple[int, int]]) -> list[PagemapEntry]:
    """`entry` without the page ranges in `zero_pages` (sorted, disjoint, [first, last))."""
    out: list[PagemapEntry] = []
    at = 0
    for a, b in [*zero_pages, (entry.nr_pages, entry.nr_pages)]:
        if a > at:
            out.append(PagemapEntry(entry.vaddr + at * PAGE, a - at, entry.flags))
        at = max(at, b)
    return out
