"""Drop all-zero pages from a CRIU image, so a restore does not write gigabytes of zeros.

A page the process wrote zeros into is dumped like any other, and a restore pays a page fault and
a copy for each. A GPU sandbox's image holds hundreds of MB of them (the CUDA driver's host copies
of device memory that was never written). `drop_zero_pages` rewrites each process's
`pagemap-<pid>.img` and its `pages-<id>.img` without the all-zero blocks of pages that lie in
anonymous private VMAs (`pages.droppable_spans`): the pages file compacted in place, the pagemap
replaced. Planning (`plan_compaction`) is pure; the scan and the compaction do the I/O.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.engine.pages import (
    PAGE,
    PE_PARENT,
    PE_PRESENT,
    CriuImageError,
    PagemapEntry,
    Vma,
    droppable_spans,
    encode_pagemap,
    parse_pagemap,
    parse_vmas,
    split_entry,
)

# Zeros are found in blocks of this many pages from each entry's start: a 16-page compare is a
# memcmp, and single zero pages scattered through a heap are not worth a pagemap entry each.
BLOCK_PAGES = 16

PIECE_PAGES = 1024  # pages a scan reads at once: 4 MiB
COPY_BYTES = 8 << 20  # the compaction moves this much at a time

_PAGEMAP_RE = re.compile(r"pagemap-(\d+)\.img")
_ZERO_BLOCK = bytes(BLOCK_PAGES * PAGE)
_ZERO_PIECE = bytes(PIECE_PAGES * PAGE)


def default_workers() -> int:
    """Threads a rewrite scans and copies with: one a core, 2 to 8."""
    return max(2, min(8, os.cpu_count() or 2))


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
