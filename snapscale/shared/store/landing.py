"""Chunks that land straight in the image: a prefetch that fetched and hashed a chunk writes it from
its buffer to the chunk's offsets in the image files materialize created, so materialize copies only
the chunks that came from the host cache (the cache still gets every fetched chunk, from the same
buffer).

One sink per materialize. Every chunk of its image goes one way, decided on the event loop: taken by
the prefetch (landing, then placed or failed) or claimed by materialize to copy from the cache. A
chunk is written only after it hashed to its name, so a corrupt chunk never reaches the image.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from snapscale.shared.store.backend import ChunkError
from snapscale.shared.store.chunking import sha256_hex

T = TypeVar("T")

_LANDING = "landing"
_PLACED = "placed"
_COPY = "copy"


@dataclass(frozen=True)
class Target:
    """`length` bytes at `offset` of an image file (its fd; its shared mapping when it has one)."""

    fd: int
    mm: mmap.mmap | None
    offset: int
    length: int


def write_target(t: Target, data: memoryview) -> None:
    """Write a chunk's bytes to one target; blocking, for a thread. The range is reserved first: on a
    full tmpfs a store into its mapping is a SIGBUS, fallocate says ENOSPC."""
    if len(data) != t.length:
        raise ChunkError("?", f"{len(data)} bytes where the image has room for {t.length}")
    os.posix_fallocate(t.fd, t.offset, t.length)
    if t.mm is None:
        done = 0
        while done < t.length:
            done += os.pwrite(t.fd, data[done:], t.offset + done)
        return
    # ctypes.memmove lets go of the GIL, so the landing threads copy side by side (a slice
    # assignment into the mapping would hold it for the whole copy and its page faults).
    src = data if not data.readonly else memoryview(bytearray(data))
    dst_c = (ctypes.c_char * t.length).from_buffer(t.mm, t.offset)
    src_c = (ctypes.c_char * t.length).from_buffer(src)
    try:
        ctypes.memmove(dst_c, src_c, t.length)
    finally:
        del dst_c, src_c  # release the exports: the mapping can be closed again


class ChunkSink(Protocol):
    """Somewhere a fetched chunk may be written from the prefetch's buffer once it hashed to its name,
    beside the cache (`ImageSink`: materialize's image). On the event loop: `take` (True:
    this prefetch writes it), then `placed` or `failed`; `write` runs on a thread between them."""

    async def opened(self) -> None: ...
    def take(self, digest: str) -> bool: ...
    def write(self, digest: str, data: memoryview) -> None: ...
    def placed(self, digest: str) -> None: ...
    def failed(self, digest: str, error: BaseException) -> None: ...


def verify_and_write(d: str, data: memoryview, sinks: list[ChunkSink]) -> list[Exception | None]:
    """Blocking: `ChunkError` unless `data` hashes to `d`; then it goes to each sink (what each
    write raised, or None)."""
    if (got := sha256_hex(data)) != d:
        raise ChunkError(d, f"{len(data)} bytes hash to {got[:16]}, not to the name")
    errors: list[Exception | None] = []
    for s in sinks:
        try:
            s.write(d, data)
            errors.append(None)
        except Exception as e:  # this sink's image fails (e.g. no space); the cache still gets it
            errors.append(e)
    return errors


async def on_thread(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` on a thread; cancelled, it still waits for the thread, which may be writing
    into memory (a buffer, an image's mapping) that the caller frees once this returns."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


class ImageSink:
    """Where a prefetch may place the chunks of the image materialize is building. Bookkeeping on the
    event loop thread; `write` on a landing thread, between `take` and `placed`/`failed`."""

    def __init__(self) -> None:
        self._targets: dict[str, list[Target]] = {}
        self._state: dict[str, str | BaseException] = {}
        self._changed: dict[str, asyncio.Future[None]] = {}
        self._open = False
        self._ready = asyncio.Event()  # open, or closed before it ever was

    # -- materialize's side --
    def open(self, targets: dict[str, list[Target]]) -> None:
        """The image files exist: from now on the prefetch may place these chunks."""
        self._targets = targets
        self._open = True
        self._ready.set()

    def close(self) -> None:
        """No chunk is taken from now on (those landing still finish: `settle`)."""
        self._open = False
        self._ready.set()

    def placed_here(self, digest: str) -> bool:
        """The prefetch wrote it into the image; raises why, if that failed."""
        st = self._state.get(digest)
        if isinstance(st, BaseException):
            raise st
        return st == _PLACED

    def landing(self, digest: str) -> bool:
        return self._state.get(digest) == _LANDING

    def claim_copy(self, digest: str) -> bool:
        """Materialize copies it from the cache: True unless the prefetch took it first."""
        return self._state.setdefault(digest, _COPY) == _COPY

    def changed(self, digest: str) -> asyncio.Future[None]:
        """Done when the prefetch places the chunk or fails to."""
        fut = self._changed.get(digest)
        if fut is None:
            fut = self._changed[digest] = asyncio.get_running_loop().create_future()
        return fut

    async def settle(self) -> None:
        """Wait until no chunk is being written (even through cancellation, re-raised at the end):
        only then may materialize close the files."""
        cancelled = False
        while busy := [self.changed(d) for d, st in self._state.items() if st == _LANDING]:
            try:
                await asyncio.wait(busy)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    # -- the prefetch's side --
    async def opened(self) -> None:
        """Until the image files exist (or materialize gave up): a prefetch starts fetching only then,
        so no chunk it brings has to be copied for want of a place."""
        await self._ready.wait()

    def take(self, digest: str) -> bool:
        """True: this prefetch writes the chunk here (after hashing it), then says how it went."""
        if not self._open or digest not in self._targets or digest in self._state:
            return False
        self._state[digest] = _LANDING
        return True

    def write(self, digest: str, data: memoryview) -> None:
        """Blocking: the hashed chunk to each of its places in the image."""
        for t in self._targets[digest]:
            try:
                write_target(t, data)
            except ChunkError as e:
                raise ChunkError(digest, e.reason) from None

    def placed(self, digest: str) -> None:
        self._settle(digest, _PLACED)

    def failed(self, digest: str, error: BaseException) -> None:
        self._settle(digest, error)

    def _settle(self, digest: str, outcome: str | BaseException) -> None:
        self._state[digest] = outcome
        fut = self._changed.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
