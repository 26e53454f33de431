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
COPY_BYTES = 8 << 20  # the rewrite's copies, spread over threads

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

    @property
    def bytes_after(self) -> int:
        return self.bytes_before - self.bytes_dropped


def _zero_blocks(fd: int, offset: int, first: int, n: int) -> list[int]:
    """The all-zero BLOCK_PAGES blocks among `n` pages from page `first` of the entry at `offset`."""
    buf = os.pread(fd, n * PAGE, offset + first * PAGE)
    if len(buf) != n * PAGE:
        raise CriuImageError("pages", f"ends inside an entry (page {first + len(buf) // PAGE})")
    if buf == _ZERO_PIECE[: len(buf)]:  # one memcmp for a piece that is zeros throughout
        return list(range(first, first + n, BLOCK_PAGES))
    step = BLOCK_PAGES * PAGE
    # a memcmp in place (a memoryview == is 10x slower)
    return [first + i // PAGE for i in range(0, len(buf), step) if buf.startswith(_ZERO_BLOCK, i)]


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


def _copy_into(src_fd: int, mm: mmap.mmap, jobs: list[tuple[int, int, int]]) -> None:
    """Read each (source offset, destination offset, length) into the mapped output file."""
    with memoryview(mm) as whole:
        for src, dst, n in jobs:
            done = 0
            while done < n:
                with whole[dst + done : dst + n] as rest:
                    got = os.preadv(src_fd, [rest], src + done)
                if got <= 0:
                    raise CriuImageError("pages", f"ends inside the entry at {src}")
                done += got


def _rewrite_one(image_dir: Path, pagemap: Path, vmas: list[Vma], workers: int) -> tuple[int, int]:
    header, pages_id, entries = parse_pagemap(pagemap)
    pages = image_dir / f"pages-{pages_id}.img"
    size = pages.stat().st_size
    if any(e.flags & PE_PARENT for e in entries):
        return size, 0  # pages live in a parent image: not ours to reshuffle
    fd = os.open(pages, os.O_RDONLY)
    try:
        offsets: list[int] = []
        off = 0
        for e in entries:
            offsets.append(off)
            if e.flags & PE_PRESENT:
                off += e.nr_pages * PAGE
        if off != size:
            raise CriuImageError(pages.name, f"{size} bytes, its pagemap accounts for {off}")
        # Scanned in 4 MiB pieces on threads: the reads run side by side (the GIL is released).
        scans = [
            (k, p, n)
            for k, e in enumerate(entries)
            for sp in droppable_spans(e, vmas)
            for p, n in _pieces(sp)
        ]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(lambda j: _zero_blocks(fd, offsets[j[0]], j[1], j[2]), scans))
        blocks: list[list[int]] = [[] for _ in entries]
        for (k, _, _), got in zip(scans, found, strict=True):
            blocks[k] += got
        plan = [(e, offsets[k], _runs(blocks[k])) for k, e in enumerate(entries)]
        dropped = sum(b - a for _, _, zeros in plan for a, b in zeros) * PAGE
        if not dropped:
            return size, 0
        tmp = pages.with_name(f".{pages.name}.compact")
        new_entries: list[PagemapEntry] = []
        jobs: list[tuple[int, int, int]] = []  # source offset, destination offset, length
        at = 0
        for e, eoff, zeros in plan:
            kept = split_entry(e, zeros)
            new_entries += kept
            if e.flags & PE_PRESENT:
                for kp in kept:
                    src, n = eoff + (kp.vaddr - e.vaddr), kp.nr_pages * PAGE
                    jobs += [(src + o, at + o, min(COPY_BYTES, n - o)) for o in range(0, n, COPY_BYTES)]
                    at += n
        try:
            out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if at:
                    # Reserved first: a full filesystem says ENOSPC here, not SIGBUS in a copy below.
                    os.posix_fallocate(out, 0, at)
                    # Into a shared mapping, on threads: writes into one file take its inode lock
                    # one at a time (tmpfs ~2 GB/s); page faults on a mapping do not.
                    with mmap.mmap(out, at) as mm, ThreadPoolExecutor(max_workers=workers) as pool:
                        share = [jobs[i::workers] for i in range(workers)]
                        for f in [pool.submit(_copy_into, fd, mm, js) for js in share if js]:
                            f.result()
                os.fchmod(out, os.stat(pages).st_mode & 0o7777)
            finally:
                os.close(out)
            tmp_map = pagemap.with_name(f".{pagemap.name}.compact")
            tmp_map.write_bytes(encode_pagemap(header, pages_id, new_entries))
            os.chmod(tmp_map, os.stat(pagemap).st_mode & 0o7777)
        except BaseException:
            tmp.unlink(missing_ok=True)
            pagemap.with_name(f".{pagemap.name}.compact").unlink(missing_ok=True)
            raise
        # Both new files are whole: swap them in back to back (the image dir is a staging dir; a
        # crash between the two renames fails the freeze, it does not ship a mixed image).
        os.rename(tmp, pages)
        os.rename(tmp_map, pagemap)
        return size, dropped
    finally:
        os.close(fd)


def drop_zero_pages(image_dir: Path, workers: int | None = None) -> DropReport:
    """Rewrite every process pagemap of a CRIU image dir without its droppable zero pages, scanning
    and copying on `workers` threads (default: `default_workers()`)."""
    workers = workers or default_workers()
    n = before = dropped = 0
    for pagemap in sorted(image_dir.iterdir()):
        m = _PAGEMAP_RE.fullmatch(pagemap.name)
        if m is None:
            continue  # pagemap-shmem-* and everything else
        mm = image_dir / f"mm-{m.group(1)}.img"
        if not mm.exists():
            continue  # a thread's or a zombie's: no memory of its own
        b, d = _rewrite_one(image_dir, pagemap, parse_vmas(mm), workers)
        n += 1 if d else 0
        before += b
        dropped += d
    return DropReport(n, before, dropped)
