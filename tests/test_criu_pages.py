"""Dropping zero pages from a CRIU image: the pagemap codec and plan (pure), then a real process
dumped, compacted and restored, whose memory must come back the same, zeros included."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
from criu_procs import criu_dump, criu_restore, python_child, read_status

from snapscale.shared.engine import pages as cp
from snapscale.shared.engine import zeropages as zp
from snapscale.shared.engine.criu import CriuBinary

A = 0x7F0000000000
ANON = cp.VMA_AREA_REGULAR | cp.VMA_ANON_PRIVATE
FILE_PRIV = cp.VMA_AREA_REGULAR | cp.VMA_FILE_PRIVATE


def test_pagemap_round_trips_through_the_codec(tmp_path: Path) -> None:
    header = cp.IMG_COMMON_MAGIC.to_bytes(4, "little") + cp.PAGEMAP_MAGIC.to_bytes(4, "little")
    entries = [
        cp.PagemapEntry(A, 3, cp.PE_PRESENT | cp.PE_LAZY),
        cp.PagemapEntry(A + 0x10000000, 1 << 33, cp.PE_PRESENT),  # more pages than 32 bits hold
    ]
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(cp.encode_pagemap(header, 7, entries))
    assert cp.parse_pagemap(p) == (header, 7, entries)


def test_a_wrong_magic_is_refused_with_the_file_named(tmp_path: Path) -> None:
    p = tmp_path / "pagemap-1.img"
    p.write_bytes(b"\0" * 16)
    with pytest.raises(cp.CriuImageError, match=r"pagemap-1\.img: magic"):
        cp.parse_pagemap(p)


def test_only_anonymous_private_memory_is_droppable() -> None:
    e = cp.PagemapEntry(A, 64, cp.PE_PRESENT)
    vmas = [
        cp.Vma(A, A + 16 * cp.PAGE, ANON),
        cp.Vma(A + 16 * cp.PAGE, A + 32 * cp.PAGE, FILE_PRIV | cp.VMA_ANON_PRIVATE),
        cp.Vma(A + 32 * cp.PAGE, A + 48 * cp.PAGE, ANON | cp.VMA_AREA_VDSO),
        cp.Vma(A + 48 * cp.PAGE, A + 80 * cp.PAGE, ANON),
    ]
    assert cp.droppable_spans(e, vmas) == [(0, 16), (48, 64)]
    assert cp.droppable_spans(cp.PagemapEntry(A, 64, cp.PE_PARENT), vmas) == []


def test_split_entry_keeps_what_is_not_zero() -> None:
    e = cp.PagemapEntry(A, 100, cp.PE_PRESENT)
    assert cp.split_entry(e, [(0, 16), (32, 64)]) == [
        cp.PagemapEntry(A + 16 * cp.PAGE, 16, cp.PE_PRESENT),
        cp.PagemapEntry(A + 64 * cp.PAGE, 36, cp.PE_PRESENT),
    ]
    assert cp.split_entry(e, [(0, 100)]) == []
    assert cp.split_entry(e, []) == [e]


def test_compaction_in_place_slides_overlapping_ranges_down_in_order(tmp_path: Path) -> None:
    """Kept pages move down over dropped ones inside the one file, by pieces: a move that overlaps
    its own source (a shift shorter than the move, longer than a piece) and moves that land where
    an earlier entry's pages were must all come out as the kept bytes, in order."""
    big = (2 * zp.COPY_BYTES) // cp.PAGE + 48  # pages: a move of more than two pieces
    entries = [
        cp.PagemapEntry(A, 64, cp.PE_PRESENT),
        cp.PagemapEntry(A + 0x1000000, 16, cp.PE_LAZY),  # no bytes in the pages file
        cp.PagemapEntry(A + 0x2000000, big, cp.PE_PRESENT),
        cp.PagemapEntry(A + 0x9000000, 32, cp.PE_PRESENT),
    ]
    zeros = [[(16, 48)], [], [(0, 16), (big - 16, big)], [(16, 32)]]
    offsets = [0, 64 * cp.PAGE, 64 * cp.PAGE, (64 + big) * cp.PAGE]
    data = bytearray(os.urandom((64 + big + 32) * cp.PAGE))
    kept = bytearray()
    for e, off, runs in zip(entries, offsets, zeros, strict=True):
        if not e.flags & cp.PE_PRESENT:
            continue
        for a, b in runs:
            data[off + a * cp.PAGE : off + b * cp.PAGE] = bytes((b - a) * cp.PAGE)
        for k in cp.split_entry(e, runs):
            start = off + (k.vaddr - e.vaddr)
            kept += data[start : start + k.nr_pages * cp.PAGE]
    plan = zp.plan_compaction(entries, offsets, zeros)
    assert plan.size == len(kept)
    assert [e.nr_pages for e in plan.entries] == [16, 16, 16, big - 32, 16]
    assert all(dst < src for src, dst, _ in plan.moves)  # the first 16 pages stay where they are
    f = tmp_path / "pages-1.img"
    f.write_bytes(data)
    ino = f.stat().st_ino
    fd = os.open(f, os.O_RDWR)
    try:
        zp._compact_in_place(fd, plan.moves, plan.size)
    finally:
        os.close(fd)
    assert f.stat().st_ino == ino  # the same file: no second copy was written
    assert f.read_bytes() == kept


CHILD = r"""
import hashlib, mmap, os, sys, time
status, backing = sys.argv[1], sys.argv[2]
rand = bytearray(os.urandom(8 << 20))
zeros = bytearray(32 << 20)
for i in range(0, len(zeros), 4096):
    zeros[i] = 0  # a written page: CRIU dumps it although it is all zeros
mixed = bytearray(16 << 20)  # 64 KiB of random bytes, then 192 KiB of written zeros, repeated
for i in range(0, len(mixed), 256 << 10):
    mixed[i : i + (64 << 10)] = os.urandom(64 << 10)
    for j in range(i + (64 << 10), i + (256 << 10), 4096):
        mixed[j] = 0
with open(backing, "wb") as f:
    f.write(b"\xab" * (4 << 20))
fd = os.open(backing, os.O_RDWR)
priv = mmap.mmap(fd, 4 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
priv[:] = bytes(4 << 20)  # zeros over the file's 0xab, private: the file keeps its bytes
digest = hashlib.sha256(rand + mixed).hexdigest()
counter = 0
while True:
    counter += 1
    ok = zeros == bytes(len(zeros)) and priv[:] == bytes(4 << 20)
    now = hashlib.sha256(rand + mixed).hexdigest()
    tmp = status + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {counter} {now}-{ok}")
    os.replace(tmp, status)
    time.sleep(0.05)
"""


@pytest.mark.criu
def test_a_compacted_image_restores_the_same_memory(criu: CriuBinary, tmp_path: Path) -> None:
    status, images = tmp_path / "status", tmp_path / "images"
    images.mkdir()
    with python_child(CHILD, str(status), str(tmp_path / "backing")) as (child, pids):
        _, before, state = read_status(status)
        assert state.endswith("-True")
        criu_dump(criu, child.pid, images)
        child.wait(10)
        _, at_dump, _ = read_status(status)

        inodes = {p.name: p.stat().st_ino for p in images.glob("pages-*.img")}
        report = zp.drop_zero_pages(images)
        assert {p.name: p.stat().st_ino for p in images.glob("pages-*.img")} == inodes  # in place
        # 32 MiB of zeros plus 8-12 of the 16 MiB mixed (blocks count from each entry's start), and
        # whatever else the interpreter zeroed; the file-private 4 MiB must stay (the restore checks).
        assert report.pagemaps == 1
        assert report.bytes_dropped >= 39 << 20, report
        pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
        assert pages == report.bytes_after
        assert zp.drop_zero_pages(images).bytes_dropped == 0  # nothing left to drop

        pids.append(criu_restore(criu, images, tmp_path / "pid"))
        _, after, state2 = read_status(status, after=at_dump)
        assert after > at_dump >= before
        assert state2 == state  # random bytes intact, zeros zero, the private mapping not the file's


FORKED = r"""
import hashlib, os, sys, time
status = sys.argv[1]
buf = bytearray(16 << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 0  # the parent's pages: written zeros ...
buf[: 4 << 20] = os.urandom(4 << 20)  # ... after 4 MiB of random bytes
pid = os.fork()
if pid == 0:
    # The child shares the parent's pages until it writes: zeros over the parent's random MiBs,
    # random bytes over some of the parent's zeros, the rest left shared.
    buf[: 2 << 20] = bytes(2 << 20)
    buf[8 << 20 : 10 << 20] = os.urandom(2 << 20)
who = "child" if pid == 0 else "parent"
digest = hashlib.sha256(buf).hexdigest()
counter = 0
while True:
    counter += 1
    now = hashlib.sha256(buf).hexdigest()
    tmp = f"{status}.{who}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {counter} {now}-{now == digest}")
    os.replace(tmp, f"{status}.{who}")
    time.sleep(0.05)
"""


@pytest.mark.criu
def test_zero_pages_of_a_parent_and_its_forked_child_restore_right(criu: CriuBinary, tmp_path: Path) -> None:
    """CRIU restores a child's inherited private memory by comparing it with the parent's; a zero
    page dropped from either side must still come back as zeros, and the other side's data intact."""
    status, images = tmp_path / "status", tmp_path / "images"
    images.mkdir()
    with python_child(FORKED, str(status)) as (parent, pids):
        before = {who: read_status(Path(f"{status}.{who}")) for who in ("parent", "child")}
        pids.append(before["child"][0])
        assert all(s[2].endswith("-True") for s in before.values())
        criu_dump(criu, parent.pid, images)
        parent.wait(10)
        child_gone = time.monotonic() + 20
        while Path(f"/proc/{pids[1]}").exists():  # reaped by whoever inherited it: its PID is free
            assert time.monotonic() < child_gone, f"child {pids[1]} never went away"
            # An engine test earlier in this process made it a subreaper: the orphan is ours to reap.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pids[1], os.WNOHANG)
            time.sleep(0.02)
        at_dump = {who: read_status(Path(f"{status}.{who}"))[1] for who in ("parent", "child")}

        report = zp.drop_zero_pages(images)
        assert report.pagemaps == 2, report  # both processes' memory was compacted
        assert report.bytes_dropped >= 10 << 20, report

        criu_restore(criu, images, tmp_path / "pid")
        for who in ("parent", "child"):
            _, counter, state = read_status(Path(f"{status}.{who}"), after=at_dump[who])
            assert counter > at_dump[who]
            assert state == before[who][2], who  # the same bytes, zeros and all
