"""Rebuild a checkpoint's image directory from the host cache so CRIU reads a normal image.

Single-chunk files become hard links to the cached chunk where the mode and filesystem allow
(CRIU only reads images on restore); the rest are assembled with parallel in-kernel copies;
zero chunks stay holes. It may run while a prefetch is still bringing chunks in.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapscale.shared.core.fsutil import copy_range, read_into
from snapscale.shared.store.backend import ChunkError
from snapscale.shared.store.cache import CHUNK_MODE, HostCache
from snapscale.shared.store.chunking import ZERO_CHUNK, chunk_length
from snapscale.shared.store.landing import ImageSink, Target
from snapscale.shared.store.manifest import FileEntry, Manifest, check_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaterializeReport:
    files: int
    bytes_total: int
    linked_files: int
    copied_bytes: int
    zero_bytes: int
    duration_s: float
    landed_bytes: int = 0  # written into the image by the prefetch that fetched them, not copied

    @property
    def throughput_bps(self) -> float:
        return self.bytes_total / self.duration_s if self.duration_s > 0 else 0.0


def _copy_range(src: Path, dst_fd: int, offset: int, length: int) -> None:
    """Copy a whole chunk file to `offset` of `dst_fd`, in the kernel when it can."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        done = copy_range(sfd, 0, dst_fd, offset, length)
        if done != length:
            raise ChunkError(src.name, f"cached chunk is {done} bytes, the manifest says {length}")
    finally:
        os.close(sfd)


def default_workers() -> int:
    """Copy threads: one a core, 4 to 16. A copy into tmpfs runs at ~1.2 GB/s a thread (page
    allocation and the copy), so a 3.5 GB GPU image wants the cores a GPU host has."""
    return max(4, min(16, os.cpu_count() or 4))


def _read_into(src: Path, mm_fd: int, mm: mmap.mmap, offset: int, length: int) -> None:
    """Read a whole chunk file into the mapped image file at `offset`. Writes into one file take
    its inode lock one thread at a time (tmpfs: ~2 GB/s, however many threads); page faults on a
    shared mapping do not, so the copy threads of a big pages file run side by side."""
    # Reserve the range first: on a full filesystem the kernel's copy into the mapping fails with
    # EFAULT ('Bad address', seen on tmpfs), which names no cause; fallocate says ENOSPC.
    os.posix_fallocate(mm_fd, offset, length)
    sfd = os.open(src, os.O_RDONLY)
    try:
        with memoryview(mm) as whole, whole[offset : offset + length] as dst:
            done = read_into(sfd, dst)
        if done != length:
            raise ChunkError(src.name, f"cached chunk is {done} bytes, the manifest says {length}")
    finally:
        os.close(sfd)


async def materialize(
    cache: HostCache,
    manifest: Manifest,
    dest_dir: Path,
    *,
    link: bool = True,
    workers: int | None = None,
    arriving: asyncio.Future[Any] | None = None,
    sink: ImageSink | None = None,
) -> MaterializeReport:
    """Write `manifest`'s files under `dest_dir` (created; must not exist or be empty).

    With `arriving` (a running prefetch), each chunk is placed as soon as it is cached; without,
    every chunk must be cached already (`ChunkError` names a missing one). With `sink` too (given
    to that prefetch), the files are made first and a chunk the prefetch fetches is written into
    them from its buffer (`landed_bytes`); only chunks from the cache are copied. On error the
    partial directory is removed.
    """
    if sink is not None and arriving is None:
        raise ValueError("a sink needs the prefetch that fills it (arriving)")
    try:
        return await _materialize(cache, manifest, dest_dir, link, workers, arriving, sink)
    finally:
        if sink is not None:
            sink.close()  # a prefetch waiting for it to open goes on without it


async def _materialize(
    cache: HostCache,
    manifest: Manifest,
    dest_dir: Path,
    link: bool,
    workers: int | None,
    arriving: asyncio.Future[Any] | None,
    sink: ImageSink | None,
) -> MaterializeReport:
    check_manifest(manifest)  # paths are re-checked here: this is where they touch the disk
    workers = workers or default_workers()
    t0 = time.monotonic()
    can_link = link and await asyncio.to_thread(_same_fs, cache.chunks_dir, dest_dir)
    loop = asyncio.get_running_loop()
    linked = copied = landed = zero = 0
    try:
        with cache.pinned(manifest.digests()), ThreadPoolExecutor(max_workers=workers) as pool:
            made: list[tuple[int, mmap.mmap | None]] = []
            jobs: list[asyncio.Future[None]] = []  # creates and copies, on the pool's threads

            async def create(files: list[FileEntry]) -> None:
                jobs.append(loop.run_in_executor(pool, _create_all, dest_dir, files, made))
                await asyncio.shield(jobs[-1])

            try:
                to_link = [f for f in manifest.files if can_link and _linkable(f)]
                to_make = [f for f in manifest.files if not (can_link and _linkable(f))]
                await create(to_make)
                opened = len(made)  # files made after this (a link refused) are not the sink's
                if sink is not None:
                    sink.open(_targets(manifest, to_make, made))
                for f in to_link:
                    await _wait_cached(cache, f.chunks[0], arriving)
                    if await asyncio.shield(
                        loop.run_in_executor(pool, _try_link, cache.path(f.chunks[0]), dest_dir / f.path)
                    ):
                        linked += 1
                        continue
                    await create([f])
                    to_make.append(f)
                for k, (f, (fd, mm)) in enumerate(zip(to_make, made, strict=True)):
                    into = sink if k < opened else None
                    for i, d in enumerate(f.chunks):
                        n = chunk_length(f.size, manifest.chunk_bytes, i)
                        if d == ZERO_CHUNK:
                            zero += n  # the file was created sparse at full size: already zeros
                            continue
                        if into is not None and await _placed_or_cached(cache, into, d, arriving):
                            landed += n
                            continue
                        await _wait_cached(cache, d, arriving)
                        copied += n
                        at = i * manifest.chunk_bytes
                        jobs.append(
                            loop.run_in_executor(pool, _read_into, cache.path(d), fd, mm, at, n)
                            if mm is not None
                            else loop.run_in_executor(pool, _copy_range, cache.path(d), fd, at, n)
                        )
                await asyncio.gather(*jobs)
            finally:
                # Never close an fd a copy or landing thread may still write to (its number could be
                # reused by another open): let every one finish first, even when cancelled.
                if sink is not None:
                    sink.close()
                    await sink.settle()
                await _settle(jobs)
                for fd, mm in made:
                    if mm is not None:
                        mm.close()
                    os.close(fd)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, dest_dir, True)
        raise
    report = MaterializeReport(
        len(manifest.files), manifest.total_bytes, linked, copied, zero, time.monotonic() - t0, landed
    )
    log.info(
        "materialized %s into %s: %d files (%d linked), %d bytes (%d landed, %d copied) in %.2fs",
        manifest.checkpoint_id, dest_dir, report.files, linked, report.bytes_total, landed, copied,
        report.duration_s,
    )  # fmt: skip
    return report


def _linkable(f: FileEntry) -> bool:
    return len(f.chunks) == 1 and f.chunks[0] != ZERO_CHUNK and f.mode == CHUNK_MODE


def _same_fs(chunks: Path, dest: Path) -> bool:
    """Prepare `dest` (a fresh dir); True when a cached chunk can be hard-linked into it."""
    _prepare_dir(dest)
    return os.stat(chunks).st_dev == os.stat(dest).st_dev


def _targets(
    m: Manifest, files: list[FileEntry], made: list[tuple[int, mmap.mmap | None]]
) -> dict[str, list[Target]]:
    """Every place of every non-zero chunk in the files made."""
    out: dict[str, list[Target]] = {}
    for f, (fd, mm) in zip(files, made, strict=True):
        for i, d in enumerate(f.chunks):
            if d != ZERO_CHUNK:
                n = chunk_length(f.size, m.chunk_bytes, i)
                out.setdefault(d, []).append(Target(fd, mm, i * m.chunk_bytes, n))
    return out


async def _placed_or_cached(
    cache: HostCache, sink: ImageSink, d: str, arriving: asyncio.Future[Any] | None
) -> bool:
    """True once the prefetch has written `d` into the image; False when it is to be copied from the
    cache instead (a hit, or a prefetch that ended without taking it): `_wait_cached` then."""
    assert arriving is not None
    while not sink.placed_here(d):  # raises why the prefetch could not write it
        if sink.landing(d):  # being written: only its outcome can end this (never the prefetch's end)
            await sink.changed(d)
            continue
        if cache.verified(d) or arriving.done():
            return not sink.claim_copy(d)  # neither landing nor placed: the claim holds (False)
        await asyncio.wait([sink.changed(d), arriving, cache.arrival(d)], return_when=asyncio.FIRST_COMPLETED)
    return True


async def _settle(futs: list[asyncio.Future[Any]]) -> None:
    """Wait until every future is done, even through cancellation (re-raised at the end)."""
    cancelled = False
    while pending := [f for f in futs if not f.done()]:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    for f in futs:
        if not f.cancelled():
            f.exception()  # mark retrieved: the first error already propagates
    if cancelled:
        raise asyncio.CancelledError


async def _wait_cached(cache: HostCache, digest: str, arriving: asyncio.Future[Any] | None) -> None:
    """Without a prefetch running, the chunk must be cached. Beside one, wait until the chunk is
    cached and hashed by this process (a chunk left on disk by an earlier run counts only once
    the prefetch has re-hashed it), or until the prefetch ends."""
    if arriving is None:
        if digest not in cache:
            raise ChunkError(digest, "not in the host cache (prefetch first)")
        return
    while not cache.verified(digest):
        if arriving.done():
            arriving.result()  # raises the prefetch's own error, if it failed
            if digest not in cache:
                raise ChunkError(digest, "the prefetch finished without bringing it")
            return  # the prefetch vouched for it (it verifies hits unless told not to)
        both: list[asyncio.Future[Any]] = [cache.arrival(digest), arriving]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)


def _prepare_dir(dest: Path) -> None:
    if dest.is_symlink():
        raise FileExistsError(f"{dest} is a symlink")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; materialize writes a fresh image dir")


def _mkparents(target: Path) -> None:
    # Only directories we create ourselves: check_manifest refused '..' and absolute paths, and
    # the dest dir started empty, so nothing here can be a planted symlink.
    target.parent.mkdir(parents=True, exist_ok=True)


def _try_link(src: Path, target: Path) -> bool:
    _mkparents(target)
    try:
        os.link(src, target)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            return False  # another filesystem (e.g. tmpfs image dir): copy instead
        raise
    return True


def _create_all(dest: Path, files: list[FileEntry], made: list[tuple[int, mmap.mmap | None]]) -> None:
    """Create `files` under `dest`, appending each one's (fd, mapping) to `made` as it is made (so a
    failure part-way leaves the made ones to close)."""
    for f in files:
        made.append(_create(dest / f.path, f))


def _create(target: Path, f: FileEntry) -> tuple[int, mmap.mmap | None]:
    """The new file's fd, and for a file of several chunks a shared mapping of it to read into."""
    _mkparents(target)
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, f.size)  # sparse: zero chunks cost nothing
        os.fchmod(fd, f.mode)
        mm = mmap.mmap(fd, f.size) if len(f.chunks) > 1 and f.size > 0 else None
    except BaseException:
        os.close(fd)
        raise
    return fd, mm
