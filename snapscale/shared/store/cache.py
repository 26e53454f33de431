"""The host cache: a directory of verified chunks under a byte budget, evicted least recently
used first, never evicting a pinned chunk.

A chunk enters only after it hashes to its name, through a temp file and a rename, so the
directory never holds a partial chunk under a real name; the index is rebuilt from it at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from snapscale.shared.core.errors import ConfigError, RetryableError
from snapscale.shared.store.backend import ChunkError
from snapscale.shared.store.chunking import is_digest, sha256_hex

log = logging.getLogger(__name__)

CHUNK_MODE = 0o644  # the mode CRIU gives its images, so a hard link into an image dir looks native
_TMP = "tmp"
_CHUNKS = "chunks"


class CacheFullError(RetryableError):
    """No room: every cached chunk is pinned by a running prefetch or restore."""


class HostCache:
    """Chunks by digest under `root/chunks/`; all bookkeeping happens on the event loop thread."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes}")
        self.root = root
        self.budget_bytes = budget_bytes
        self._chunks = root / _CHUNKS
        self._tmp = root / _TMP
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._pins: Counter[str] = Counter()
        self._reserved = 0  # bytes being written right now
        self._arrivals: dict[str, asyncio.Future[None]] = {}
        self._writing: set[asyncio.Future[None]] = set()
        # Hashed by this process (inserted, or re-verified). Chunks found on disk at start are not,
        # until a prefetch re-hashes them: a materialize beside a prefetch waits for that.
        self._verified: set[str] = set()
        self.used_bytes = 0
        self.evicted = 0
        self.dropped_corrupt = 0
        self._rebuild()

    # -- index --
    def _rebuild(self) -> None:
        """Index the directory as a restarted agent finds it; temp files are partial, so go."""
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        for p in self._tmp.iterdir():
            p.unlink(missing_ok=True)
        found: list[tuple[float, str, int]] = []
        for p in self._chunks.iterdir():
            if not is_digest(p.name) or not p.is_file() or p.is_symlink():
                log.warning("cache: removing stray %s", p)
                p.unlink(missing_ok=True)
                continue
            st = p.stat()
            found.append((st.st_mtime, p.name, st.st_size))
        for _mtime, d, size in sorted(found):  # mtime is the last use: oldest evicts first
            self._lru[d] = size
            self.used_bytes += size
        if found:
            log.info("cache: %d chunks, %d bytes found in %s", len(found), self.used_bytes, self.root)

    def path(self, digest: str) -> Path:
        return self._chunks / digest

    @property
    def chunks_dir(self) -> Path:
        """Where every chunk lies under its digest (a restored workload fills its weights from here)."""
        return self._chunks

    def __contains__(self, digest: object) -> bool:
        return digest in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def digests(self) -> list[str]:
        return list(self._lru)

    def size_of(self, digest: str) -> int | None:
        return self._lru.get(digest)

    def use(self, digest: str) -> bool:
        """Mark a hit (most recently used); False if absent."""
        if digest not in self._lru:
            return False
        self._lru.move_to_end(digest)
        try:
            os.utime(self.path(digest))  # mtime is the last use, so LRU order survives a restart
        except FileNotFoundError:
            self._forget(digest)
            return False
        return True

    # -- pins --
    def pin(self, digests: Iterable[str]) -> None:
        self._pins.update(digests)

    def unpin(self, digests: Iterable[str]) -> None:
        self._pins.subtract(digests)
        for d in [d for d, n in self._pins.items() if n <= 0]:
            del self._pins[d]

    def is_pinned(self, digest: str) -> bool:
        return self._pins[digest] > 0

    @contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these chunks (present now or inserted later) from eviction for the block."""
        ds = list(digests)
        self.pin(ds)
        try:
            yield
        finally:
            self.unpin(ds)

    # -- entries --
    async def insert(self, digest: str, data: bytes | memoryview, *, hashed: bool = False) -> None:
        """Verify `data` against `digest` and store it; `ChunkError` if it does not match (`hashed`:
        the caller hashed these very bytes already). The caller may reuse `data`'s memory once this
        returns (or raises): no thread holds it by then."""
        if digest in self._verified:
            self._lru.move_to_end(digest)
            return
        while True:
            try:
                self._make_room(len(data))
                break
            except CacheFullError:
                if not self._writing:
                    raise
                # Room is only promised to writes in flight; once one lands it may be evictable.
                await asyncio.wait(list(self._writing), return_when=asyncio.FIRST_COMPLETED)
            if digest in self._verified:
                return
        self._reserved += len(data)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._write_chunk if hashed else self._write_verified, digest, data)
        self._writing.add(fut)
        fut.add_done_callback(self._writing.discard)
        try:
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The thread cannot be stopped; let it finish so no temp file outlives us.
                await asyncio.wait([fut])
                raise
        finally:
            self._reserved -= len(data)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                if digest not in self._lru:
                    self._lru[digest] = len(data)
                    self.used_bytes += len(data)
                self._mark_verified(digest)

    def verified(self, digest: str) -> bool:
        """Cached and hashed by this process (inserted, or re-verified since the start)."""
        return digest in self._verified

    def _mark_verified(self, digest: str) -> None:
        self._verified.add(digest)
        waiter = self._arrivals.pop(digest, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arrival(self, digest: str) -> asyncio.Future[None]:
        """A future that completes when `digest` is cached and verified (at once if it is)."""
        loop = asyncio.get_running_loop()
        fut = self._arrivals.get(digest)
        if fut is None or fut.done() or fut.get_loop() is not loop:
            fut = loop.create_future()
            if digest in self._verified:
                fut.set_result(None)
            else:
                self._arrivals[digest] = fut
        return fut

    def _write_verified(self, digest: str, data: bytes | memoryview) -> None:
        if sha256_hex(data) != digest:
            raise ChunkError(digest, f"{len(data)} bytes hash to {sha256_hex(data)[:16]}, not to the name")
        self._write_chunk(digest, data)

    def _write_chunk(self, digest: str, data: bytes | memoryview) -> None:
        """Temp file, then a rename to the chunk's name: never a partial chunk under a real name."""
        tmp = self._tmp / f"{digest}.{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, CHUNK_MODE)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, CHUNK_MODE)  # whatever the umask
            finally:
                os.close(fd)
            # No fsync: a chunk lost or torn by a power cut is caught by verification and refetched.
            os.rename(tmp, self.path(digest))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def read(self, digest: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(digest).read_bytes)
        except FileNotFoundError:
            self._forget(digest)
            raise ChunkError(digest, "not in the cache") from None

    async def verify(self, digest: str) -> bool:
        """Rehash a cached chunk; a corrupt or vanished one is dropped (and False returned)."""
        try:
            data = await asyncio.to_thread(self.path(digest).read_bytes)
        except FileNotFoundError:
            self._forget(digest)
            return False
        if await asyncio.to_thread(sha256_hex, data) == digest:
            if digest in self._lru:
                self._mark_verified(digest)
            return True
        log.warning("cache: chunk %s is corrupt; dropping it", digest[:16])
        self.dropped_corrupt += 1
        self.drop(digest)
        return False

    def drop(self, digest: str) -> None:
        self._forget(digest)
        self.path(digest).unlink(missing_ok=True)

    def _forget(self, digest: str) -> None:
        self._verified.discard(digest)
        size = self._lru.pop(digest, None)
        if size is not None:
            self.used_bytes -= size

    def _make_room(self, need: int) -> None:
        if need > self.budget_bytes:
            raise ConfigError(
                f"a {need}-byte chunk exceeds the whole cache budget ({self.budget_bytes} bytes): "
                "raise SNAPSCALE_CACHE_BYTES"
            )
        over = self.used_bytes + self._reserved + need - self.budget_bytes
        if over <= 0:
            return
        victims: list[str] = []
        for d, size in self._lru.items():  # oldest first
            if over <= 0:
                break
            if self._pins[d] > 0:
                continue
            victims.append(d)
            over -= size
        if over > 0:
            raise CacheFullError(
                f"cache budget {self.budget_bytes} bytes: {self.used_bytes} used, "
                f"{self._reserved} being written, the rest pinned; cannot fit {need} more",
                delay_s=1.0,
            )
        for d in victims:
            self.drop(d)
            self.evicted += 1
