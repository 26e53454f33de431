"""Drop all-zero pages from a CRIU image, so a restore does not write gigabytes of zeros.

CRIU restores a private anonymous page that has no pagemap entry as a zero page: the mapping is
fresh, and where a child inherited its parent's copy CRIU drops it (`MADV_DONTNEED`, criu/mem.c
`restore_priv_vma_content`). A page the process wrote zeros into is dumped all the same, and a
restore pays a page fault and a copy for each. A GPU sandbox's image holds hundreds of MB of them
(the CUDA driver's host copies of device memory that was never written).

`drop_zero_pages` rewrites each process's `pagemap-<pid>.img` and its `pages-<id>.img` without
the all-zero blocks of pages that lie in anonymous private VMAs (read from `mm-<pid>.img`).
File-backed private pages stay: without an entry CRIU would restore the file's bytes there.
Shared memory (`pagemap-shmem-*`), lazy or parent-image entries are left as they are.

Pure parsing and planning, plus one function that rewrites files. The three protobuf messages
go through `protowire`, as CRIU's stats images do in `criu.py`.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.core.errors import SnapscaleError
from snapscale.shared.engine import protowire as pw

PAGE = 4096
# Zeros are found in blocks of this many pages from each entry's start: a 16-page compare is a
# memcmp, and single zero pages scattered through a heap are not worth a pagemap entry each.
BLOCK_PAGES = 16

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

PIECE_PAGES = 1024  # pages a scan reads at once: 4 MiB
COPY_BYTES = 8 << 20  # the compaction moves this much at a time

_PAGEMAP_RE = re.compile(r"pagemap-(\d+)\.img")
_ZERO_BLOCK = bytes(BLOCK_PAGES * PAGE)
_ZERO_PIECE = bytes(PIECE_PAGES * PAGE)


def default_workers() -> int:
    """Threads a rewrite scans and copies with: one a core, 2 to 8."""
    return max(2, min(8, os.cpu_count() or 2))


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


# -- rewriting (I/O) --


@dataclass(frozen=True)
class DropReport:
    pagemaps: int  # process pagemaps rewritten
    bytes_before: int  # of their pages files
    bytes_dropped: int
    scan_s: float = 0.0  # finding the zero blocks
    compact_s: float = 0.0  # moving the kept pages down, writing the pagemaps

    @property
    def bytes_after(self) -> int:
        return self.bytes_before - self.bytes_dropped


def _zero_blocks(buf: bytearray, first: int, n: int) -> list[int]:
    """The all-zero BLOCK_PAGES blocks among the `n` pages from page `first` read into `buf`."""
    if n * PAGE == len(buf) and buf.startswith(_ZERO_PIECE):  # one memcmp: zeros throughout
        return list(range(first, first + n, BLOCK_PAGES))
    step = BLOCK_PAGES * PAGE
    # a memcmp in place (a memoryview == is 10x slower)
    return [first + i // PAGE for i in range(0, n * PAGE, step) if buf.startswith(_ZERO_BLOCK, i)]


def _scan_share(fd: int, jobs: list[tuple[int, int, int]]) -> list[list[int]]:
    """Each (file offset of the entry, first page, pages) job's zero blocks, read into one buffer
    reused for every piece: a fresh 4 MiB `bytes` a read costs a page fault and a zeroing per page
    (and an mmap/munmap, which serializes the threads), more than the read and compare together."""
    buf = bytearray(PIECE_PAGES * PAGE)
    out: list[list[int]] = []
    with memoryview(buf) as whole:
        for offset, first, n in jobs:
            with whole[: n * PAGE] as into:
                got = os.preadv(fd, [into], offset + first * PAGE)
            if got != n * PAGE:  # the size was checked: only a writer beside us shortens it
                raise CriuImageError("pages", f"ends inside an entry (page {first + got // PAGE})")
            out.append(_zero_blocks(buf, first, n))
    return out


def _pieces(span: tuple[int, int]) -> list[tuple[int, int]]:
    """(first page, pages) of the whole BLOCK_PAGES blocks in `span` (blocks aligned to the entry,
    not to the span), PIECE_PAGES at most a piece. Pure."""
    out = []
    p = span[0] + (-span[0]) % BLOCK_PAGES
    while p + BLOCK_PAGES <= span[1]:
        n = min(PIECE_PAGES, (span[1] - p) // BLOCK_PAGES * BLOCK_PAGES)
        out.append((p, n))
        p += n
    return out


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted zero blocks' first pages merged into [first, last) page runs. Pure."""
    runs: list[tuple[int, int]] = []
    for a in blocks:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + BLOCK_PAGES)
        else:
            runs.append((a, a + BLOCK_PAGES))
    return runs


@dataclass(frozen=True)
class Compaction:
    """What a pages file becomes: its pagemap's new entries, and the moves (source offset,
    destination offset, length; in file order, each destination at or before its source) that
    slide its kept pages down over the dropped ones, leaving `size` bytes."""

    entries: list[PagemapEntry]
    moves: list[tuple[int, int, int]]
    size: int


def plan_compaction(
    entries: list[PagemapEntry], offsets: list[int], zeros: list[list[tuple[int, int]]]
) -> Compaction:
    """The compaction of a pages file whose entries (at `offsets` in it) lose the page runs in
    `zeros` (one sorted list of [first, last) runs per entry). Pure."""
    new_entries: list[PagemapEntry] = []
    moves: list[tuple[int, int, int]] = []
    at = 0
    for e, eoff, runs in zip(entries, offsets, zeros, strict=True):
        kept = split_entry(e, runs)
        new_entries += kept
        if not e.flags & PE_PRESENT:
            continue
        for kp in kept:
            src, n = eoff + (kp.vaddr - e.vaddr), kp.nr_pages * PAGE
            if moves and moves[-1][0] + moves[-1][2] == src and moves[-1][1] + moves[-1][2] == at:
                moves[-1] = (moves[-1][0], moves[-1][1], moves[-1][2] + n)  # contiguous: one move
            else:
                moves.append((src, at, n))
            at += n
    return Compaction(new_entries, [m for m in moves if m[0] != m[1]], at)


def _compact_in_place(fd: int, moves: list[tuple[int, int, int]], size: int) -> None:
    """Slide the kept pages down in the file itself, then cut it at `size`: no second copy of the
    image is allocated (on tmpfs that allocation, its zeroing and freeing the old file cost more
    than the copy). Moves go in file order, COPY_BYTES at a time: a destination never overlaps a
    source not yet read. Through a shared mapping populated up front (one fault a page otherwise)."""
    if moves:
        base = moves[0][1] // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        length = os.fstat(fd).st_size - base
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(fd, length, flags=flags, offset=base) as mm:
            for src, dst, n in moves:
                for o in range(0, n, COPY_BYTES):  # bounded pieces: the GIL is let go between
                    mm.move(dst - base + o, src - base + o, min(COPY_BYTES, n - o))
    os.ftruncate(fd, size)


def _zero_runs(
    fd: int, entries: list[PagemapEntry], offsets: list[int], vmas: list[Vma], workers: int
) -> list[list[tuple[int, int]]]:
    """Each entry's droppable zero page runs, scanned in 4 MiB pieces on `workers` threads (the
    reads run side by side: the GIL is released)."""
    scans = [
        (offsets[k], p, n, k)
        for k, e in enumerate(entries)
        for sp in droppable_spans(e, vmas)
        for p, n in _pieces(sp)
    ]
    shares = [js for js in (scans[i::workers] for i in range(workers)) if js]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda js: _scan_share(fd, [j[:3] for j in js]), shares))
    blocks: list[list[int]] = [[] for _ in entries]
    for js, got in zip(shares, found, strict=True):
        for j, b in zip(js, got, strict=True):
            blocks[j[3]] += b
    return [_runs(sorted(b)) for b in blocks]


def _rewrite_one(image_dir: Path, pagemap: Path, vmas: list[Vma], workers: int) -> tuple[int, int, float]:
    """(pages bytes before, bytes dropped, seconds of them scanning) for one process's pair."""
    header, pages_id, entries = parse_pagemap(pagemap)
    pages = image_dir / f"pages-{pages_id}.img"
    size = pages.stat().st_size
    if any(e.flags & PE_PARENT for e in entries):
        return size, 0, 0.0  # pages live in a parent image: not ours to reshuffle
    fd = os.open(pages, os.O_RDWR)
    try:
        offsets: list[int] = []
        off = 0
        for e in entries:
            offsets.append(off)
            if e.flags & PE_PRESENT:
                off += e.nr_pages * PAGE
        if off != size:
            raise CriuImageError(pages.name, f"{size} bytes, its pagemap accounts for {off}")
        t0 = time.monotonic()
        plan = plan_compaction(entries, offsets, _zero_runs(fd, entries, offsets, vmas, workers))
        scan_s = time.monotonic() - t0
        if plan.size == size:
            return size, 0, scan_s
        # From here on the image is rewritten: an error fails the freeze (its staging dir is
        # dropped), it never ships. The new pagemap is written first, swapped in last.
        tmp_map = pagemap.with_name(f".{pagemap.name}.compact")
        try:
            tmp_map.write_bytes(encode_pagemap(header, pages_id, plan.entries))
            os.chmod(tmp_map, os.stat(pagemap).st_mode & 0o7777)
            _compact_in_place(fd, plan.moves, plan.size)
        except BaseException:
            tmp_map.unlink(missing_ok=True)
            raise
        os.rename(tmp_map, pagemap)
        return size, size - plan.size, scan_s
    finally:
        os.close(fd)


def drop_zero_pages(image_dir: Path, workers: int | None = None) -> DropReport:
    """Rewrite every process pagemap of a CRIU image dir, and its pages file in place, without its
    droppable zero pages, scanning on `workers` threads (default: `default_workers()`).
    A `CriuImageError` leaves every pair whole (each rewritten or untouched); any other error
    leaves the image unusable."""
    workers = workers or default_workers()
    t0 = time.monotonic()
    n = before = dropped = 0
    scan_s = 0.0
    for pagemap in sorted(image_dir.iterdir()):
        m = _PAGEMAP_RE.fullmatch(pagemap.name)
        if m is None:
            continue  # pagemap-shmem-* and everything else
        mm = image_dir / f"mm-{m.group(1)}.img"
        if not mm.exists():
            continue  # a thread's or a zombie's: no memory of its own
        b, d, s = _rewrite_one(image_dir, pagemap, parse_vmas(mm), workers)
        n += 1 if d else 0
        before += b
        dropped += d
        scan_s += s
    took = time.monotonic() - t0
    return DropReport(n, before, dropped, round(scan_s, 4), round(took - scan_s, 4))
