"""Prefetch: bring a manifest's chunks from the store into the host cache, in parallel, verified,
with progress reports. A second prefetch of the same checkpoint joins the running one.

Cancelling the last waiter cancels the download; the cache never holds a partial chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.store.backend import ChunkError, ChunkStore, run_bounded
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.landing import ChunkSink, on_thread, verify_and_write
from snapscale.shared.store.manifest import WEIGHTS_FORMAT_VERSION, Manifest

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.1


@dataclass(frozen=True)
class PrefetchProgress:
    checkpoint_id: str
    chunks_total: int
    chunks_done: int
    bytes_total: int
    bytes_done: int  # fetched plus found in the cache
    bytes_fetched: int
    cached_chunks: int
    elapsed_s: float

    @property
    def throughput_bps(self) -> float:
        return self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class PrefetchReport:
    checkpoint_id: str
    chunks: int
    bytes_total: int  # distinct non-zero chunk bytes
    bytes_fetched: int
    chunks_fetched: int
    cached_chunks: int
    cached_bytes: int
    refetched: int  # chunks that arrived corrupt and were fetched again
    corrupt_hits: int  # cached chunks found corrupt, dropped and fetched
    duration_s: float
    joined: bool = False  # this caller joined a prefetch already running

    @property
    def throughput_bps(self) -> float:
        return self.bytes_total / self.duration_s if self.duration_s > 0 else 0.0


ProgressCb = Callable[[PrefetchProgress], None]


def split_weights(m: Manifest) -> tuple[Manifest, Manifest]:
    """A checkpoint with weights as two prefetches: its image's chunks, then its weights (a restore
    starts once the image is there; the weights are needed only by after_restore). Pure."""
    return replace(m, weights=[]), replace(m, files=[])


def part_of(m: Manifest) -> str:
    """'' for a whole checkpoint; a part from `split_weights` is its own job: a prefetch of the
    whole never joins one (it would return without the rest)."""
    if m.format_version == WEIGHTS_FORMAT_VERSION and not m.weights:
        return "#image"
    return "#weights" if m.weights and not m.files else ""


@dataclass
class _Job:
    task: asyncio.Task[PrefetchReport]
    callbacks: list[ProgressCb] = field(default_factory=list)
    sinks: list[ChunkSink] = field(default_factory=list)
    waiters: int = 0


class Prefetcher:
    """One per host: shares the store's connections and the cache among concurrent prefetches."""

    def __init__(
        self, store: ChunkStore, cache: HostCache, *, concurrency: int = 16, verify_hits: bool = True
    ) -> None:
        self.store = store
        self.cache = cache
        self.concurrency = concurrency
        self.verify_hits = verify_hits
        self._jobs: dict[str, _Job] = {}

    def running(self) -> list[str]:
        return list(self._jobs)

    async def prefetch(
        self, manifest: Manifest, progress_cb: ProgressCb | None = None, sink: ChunkSink | None = None
    ) -> PrefetchReport:
        """All of `manifest`'s chunks verified in the cache, or `ChunkError`/`StoreError`/`CacheFullError`.
        With `sink`, each chunk fetched from now on (this caller's, or a running prefetch's it joins)
        is offered to it too, from the same buffer (once the sink is open)."""
        if sink is not None:
            await sink.opened()
        key = f"{manifest.deployment}/{manifest.checkpoint_id}{part_of(manifest)}"
        job = self._jobs.get(key)
        joined = job is not None
        if job is None:
            job = _Job(asyncio.create_task(self._run(manifest, key), name=f"prefetch {key}"))
            self._jobs[key] = job
            job.task.add_done_callback(lambda _t: self._jobs.pop(key, None))
        if progress_cb is not None:
            job.callbacks.append(progress_cb)
        if sink is not None:
            job.sinks.append(sink)
        job.waiters += 1
        try:
            report = await asyncio.shield(job.task)
        except asyncio.CancelledError:
            job.waiters -= 1
            if job.waiters == 0 and not job.task.done():
                job.task.cancel()
                # Wait for the download to wind down so the cache is settled when we return.
                await asyncio.wait([job.task])
            raise
        finally:
            if progress_cb is not None and progress_cb in job.callbacks:
                job.callbacks.remove(progress_cb)
            if sink is not None and sink in job.sinks:
                job.sinks.remove(sink)
        job.waiters -= 1
        return replace(report, joined=True) if joined else report

    async def _run(self, m: Manifest, key: str) -> PrefetchReport:
        sizes = m.chunk_sizes()
        if sum(sizes.values()) > self.cache.budget_bytes:
            # Say so before downloading anything: it would evict itself and fail near the end.
            raise ConfigError(
                f"checkpoint {key} needs {sum(sizes.values())} bytes of chunks; the host cache holds "
                f"{self.cache.budget_bytes}: raise SNAPSCALE_CACHE_BYTES"
            )

        def job_cbs() -> list[ProgressCb]:
            job = self._jobs.get(key)
            return job.callbacks if job is not None else []

        def job_sinks() -> list[ChunkSink]:
            job = self._jobs.get(key)
            return job.sinks if job is not None else []

        t0 = time.monotonic()
        st = {"done": 0, "bytes_done": 0, "fetched": 0, "chunks_fetched": 0, "cached_chunks": 0,
              "cached_bytes": 0, "refetched": 0, "corrupt_hits": 0}  # fmt: skip
        last_emit = 0.0

        def emit(force: bool = False) -> None:
            nonlocal last_emit
            now = time.monotonic()
            if not force and now - last_emit < PROGRESS_EVERY_S:
                return
            last_emit = now
            p = PrefetchProgress(
                m.checkpoint_id, len(sizes), st["done"], sum(sizes.values()), st["bytes_done"],
                st["fetched"], st["cached_chunks"], now - t0,
            )  # fmt: skip
            for cb in list(job_cbs()):
                try:
                    cb(p)
                except Exception:
                    log.exception("prefetch progress callback failed")

        async def good_hit(d: str) -> bool:
            """The cached copy is good (counted); False when the chunk must be fetched after all."""
            if not self.verify_hits or await self.cache.verify(d):
                st["cached_chunks"] += 1
                st["cached_bytes"] += sizes[d]
                st["done"] += 1
                st["bytes_done"] += sizes[d]
                emit()
                return True
            st["corrupt_hits"] += 1
            return False

        async def land(d: str, buf: memoryview, n: int | None) -> None:
            """Verify a fetched chunk (the first `n` bytes of `buf`; None: it came larger than the
            manifest says) and cache it; a sink that takes it gets it first, once it hashed right.
            One that arrived corrupt is fetched once more."""
            sinks = [s for s in job_sinks() if s.take(d)]
            settled = not sinks

            async def keep(n: int | None) -> None:
                nonlocal settled
                if n is None:
                    raise ChunkError(d, "larger than the manifest says")
                if not sinks:  # hash and cache write in one hop, as a prefetch alone has it
                    await self.cache.insert(d, buf[:n])
                    return
                errors = await on_thread(verify_and_write, d, buf[:n], sinks)
                for s, err in zip(sinks, errors, strict=True):
                    if err is None:
                        s.placed(d)
                    else:
                        s.failed(d, err)
                settled = True  # the image has it: the cache write is off its way
                await self.cache.insert(d, buf[:n], hashed=True)

            try:
                try:
                    await keep(n)
                except ChunkError:
                    st["refetched"] += 1
                    log.warning("prefetch %s: chunk %s arrived corrupt, fetching once more", key, d[:16])
                    try:
                        await keep(await self.store.get_chunk_into(d, buf))
                    except ChunkError as e:
                        raise ChunkError(d, f"corrupt in the store, twice: {e.reason}") from None
            except BaseException as e:
                if not settled:
                    why = e if isinstance(e, Exception) else ChunkError(d, "the prefetch stopped first")
                    for s in sinks:
                        s.failed(d, why)
                raise
            st["fetched"] += sizes[d]
            st["chunks_fetched"] += 1
            st["done"] += 1
            st["bytes_done"] += sizes[d]
            emit()

        # One task a chunk, at most `concurrency` downloading (a semaphore hands the next GET out
        # the moment one finishes; `concurrency` workers looping over the chunks ran ~10% slower
        # against moto on the GPU machine, bench/prefetch_isolate.py --structure). A chunk is read
        # into a buffer of the pool below and landed (hash + cache write, and a sink's write, on
        # threads) from it beside the downloads; 2 x concurrency buffers bound the memory. Reusing
        # buffers, rather than a fresh bytes a chunk freed after landing, kept the prefetch level
        # with a plain download on the GPU machine (bench/prefetch_alloc.py).
        fetch_slots = asyncio.Semaphore(self.concurrency)
        pool = _Buffers(max(sizes.values(), default=0), 2 * self.concurrency)
        landings: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        async def one(d: str) -> None:
            if self.cache.use(d):
                async with fetch_slots:  # re-hashing cached chunks is bounded like downloads
                    if failed:
                        raise failed[0]
                    if await good_hit(d):
                        return
            buf = await pool.take()
            view = memoryview(buf)[: sizes[d]]
            try:
                async with fetch_slots:
                    if failed:
                        raise failed[0]
                    try:
                        n: int | None = await self.store.get_chunk_into(d, view)
                    except ChunkError:
                        n = None  # too big: landing fetches it once more, like one that hashes wrong
            except BaseException:
                pool.give(buf)
                raise
            t = asyncio.create_task(land(d, view, n))
            landings.add(t)

            def landed(t: asyncio.Task[None]) -> None:
                landings.discard(t)
                pool.give(buf)
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    failed.append(exc)

            t.add_done_callback(landed)

        # Digests in file order, so a materialize that runs alongside finds early files first (the
        # semaphore wakes waiters in order); the weights outside the image last (read after it).
        order = list(dict.fromkeys(c for f in m.files for c in f.chunks if c in sizes))
        order += sorted(m.weight_digests() - set(order))
        with self.cache.pinned(order):
            try:
                await run_bounded(order, one, max(1, len(order)))
                while landings:
                    await asyncio.wait(set(landings))
                if failed:
                    raise failed[0]
            finally:
                # Cancelled or failed: settle every chunk in flight, so none is left half-written.
                for t in landings:
                    t.cancel()
                while landings:
                    await asyncio.wait(set(landings))
        emit(force=True)
        dur = time.monotonic() - t0
        report = PrefetchReport(
            m.checkpoint_id, len(sizes), sum(sizes.values()), st["fetched"], st["chunks_fetched"],
            st["cached_chunks"], st["cached_bytes"], st["refetched"], st["corrupt_hits"], dur,
        )  # fmt: skip
        log.info(
            "prefetched %s: %d chunks, %d bytes fetched, %d hits, %.2fs, %.0f MB/s",
            key, report.chunks, report.bytes_fetched, report.cached_chunks, dur, report.throughput_bps / 1e6,
        )  # fmt: skip
        return report


class _Buffers:
    """Chunk buffers for one prefetch: made as needed, at most `limit`, each reused once its chunk
    has landed."""

    def __init__(self, size: int, limit: int) -> None:
        self._size = size
        self._free: list[bytearray] = []
        self._slots = asyncio.Semaphore(limit)

    async def take(self) -> bytearray:
        await self._slots.acquire()
        return self._free.pop() if self._free else bytearray(self._size)

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)
        self._slots.release()
