"""Investigation only: does the prefetch client's memory churn (a fresh 8 MiB bytes a chunk, freed
after landing) or aiohttp's 64 KiB read buffer cost it against a plain download from moto?
Variants alternate (ABBA) over rounds; medians reported. --mallopt fixes glibc's mmap/trim
thresholds first. Usage: python -m bench.prefetch_alloc [--rounds N] [--pars 8,16] [--mallopt]
[--only "plain,prefetch,prefetch + lean cache write,blocks as received + landing"]
"prefetch" reads bodies straight into its buffers (shared/httpget.py); "prefetch via aioboto3
bodies" is the same with SNAPSCALE_S3_DIRECT_GET=0."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import bench.prefetch as bp
from bench.prefetch_isolate import minflt
from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.engine import procs
from snapscale.shared.store.backend import ChunkError, chunk_key, open_store
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.manifest import Manifest
from snapscale.shared.store.s3 import S3Store


def big_reads(s3: Any, bufsize: int) -> None:
    """Give the client's aiohttp session a larger read buffer (pause threshold 2x this)."""
    hs = s3._endpoint.http_session
    orig = hs._get_session

    async def get_session(proxy_url: Any) -> Any:
        sess = await orig(proxy_url)
        sess._read_bufsize = bufsize
        return sess

    hs._get_session = get_session


async def pooled(ep: str, m: Manifest, work: Any, par: int, land: bool, bufsize: int) -> None:
    ss = StoreSettings(f"s3://{bp.BUCKET}/p", endpoint_url=ep, max_concurrency=par)
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = HostCache(cache_dir, 64 << 30)
    sizes = m.chunk_sizes()
    order = list(dict.fromkeys(c for f in m.files for c in f.chunks if c in sizes))
    async with open_store(ss) as st:
        assert isinstance(st, S3Store)
        cl = st._client
        if bufsize:
            big_reads(cl, bufsize)
        free: list[bytearray] = []
        bufs = asyncio.Semaphore(2 * par)
        sem = asyncio.Semaphore(par)

        async def one(d: str) -> None:
            await bufs.acquire()
            buf = free.pop() if free else bytearray(m.chunk_bytes)
            try:
                view = memoryview(buf)
                async with sem:
                    r = await cl.get_object(Bucket=bp.BUCKET, Key=f"p/{chunk_key(d)}")
                    pos = 0
                    async with r["Body"] as body:
                        content = body.content
                        while True:
                            b, _ = await content.readchunk()
                            if not b:
                                break
                            view[pos : pos + len(b)] = b
                            pos += len(b)
                if land:
                    await cache.insert(d, view[:pos])
            finally:
                free.append(buf)
                bufs.release()

        await asyncio.gather(*(one(d) for d in order))


_SEQ = itertools.count()


class LeanCache(HostCache):
    """The host cache with fewer GIL-releasing calls a chunk write: a temp name from a counter
    (no uuid4) and no fchmod (CHUNK_MODE at open; right wherever the umask keeps those bits)."""

    def _write_chunk(self, digest: str, data: bytes | memoryview) -> None:
        tmp = os.path.join(self.root, "tmp", f"{digest}.{os.getpid()}.{next(_SEQ)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.root, "chunks", digest))


def land_blocks(cache: HostCache, d: str, blocks: list[bytes]) -> None:
    """On a thread: hash the blocks as received and write them with writev (temp + rename, as the
    cache does): the event loop never copies the body."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(b)
    if h.hexdigest() != d:
        raise ChunkError(d, "hashed wrong")
    tmp = cache.root / "tmp" / f"{d}.{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = sum(len(b) for b in blocks)
        views = [memoryview(b) for b in blocks]
        while left:
            n = os.writev(fd, views[:1024])  # IOV_MAX
            left -= n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
    finally:
        os.close(fd)
    os.rename(tmp, cache.path(d))


async def blocks_as_received(ep: str, m: Manifest, work: Any, par: int) -> None:
    """Untried on the GPU machine: the body kept as aiohttp's blocks (no copy on the event loop,
    where plain's bytes.join makes one) and landed by `land_blocks` on a thread."""
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = HostCache(cache_dir, 64 << 30)
    sizes = m.chunk_sizes()
    order = list(dict.fromkeys(c for f in m.files for c in f.chunks if c in sizes))
    ss = StoreSettings(f"s3://{bp.BUCKET}/p", endpoint_url=ep, max_concurrency=par)
    loop = asyncio.get_running_loop()
    async with open_store(ss) as st:
        assert isinstance(st, S3Store)
        cl = st._client
        held = asyncio.Semaphore(2 * par)  # chunks in memory, as the Prefetcher's buffers bound them
        sem = asyncio.Semaphore(par)

        async def one(d: str) -> None:
            async with held:
                async with sem:
                    r = await cl.get_object(Bucket=bp.BUCKET, Key=f"p/{chunk_key(d)}")
                    blocks: list[bytes] = []
                    async with r["Body"] as body:
                        while True:
                            b, _ = await body.content.readchunk()
                            if not b:
                                break
                            blocks.append(b)
                await loop.run_in_executor(None, land_blocks, cache, d, blocks)

        await asyncio.gather(*(one(d) for d in order))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--pars", default="8,16")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--mallopt", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (plain is the base)")
    a = ap.parse_args()
    if a.mallopt:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    async with bp.moto_with_image(a.mib) as (moto_pid, ep, m, work):
        ds = sorted(m.digests())
        gb = m.unique_bytes / 1e9
        for par in [int(x) for x in a.pars.split(",")]:
            variants: dict[str, Callable[[], Awaitable[object]]] = {
                "plain": functools.partial(bp.plain_download, ep, "p", ds, par),
                "prefetch": functools.partial(bp.prefetch_once, ep, "p", m, work, par),
                "prefetch via aioboto3 bodies": functools.partial(
                    bp.prefetch_once, ep, "p", m, work, par, HostCache, False
                ),
                "pool, no landing": functools.partial(pooled, ep, m, work, par, False, 0),
                "pool + landing": functools.partial(pooled, ep, m, work, par, True, 0),
                "pool + landing, 4 MiB reads": functools.partial(pooled, ep, m, work, par, True, 4 << 20),
                "blocks as received + landing": functools.partial(blocks_as_received, ep, m, work, par),
                "prefetch + lean cache write": functools.partial(
                    bp.prefetch_once, ep, "p", m, work, par, LeanCache
                ),
            }
            if a.only:
                variants = {k: v for k, v in variants.items() if k in a.only.split(",")}
            res: dict[str, list[tuple[float, float, float, float, float]]] = {k: [] for k in variants}
            for r in range(a.rounds):
                for k in list(variants) if r % 2 == 0 else list(reversed(variants)):
                    t0, c0, p0 = time.monotonic(), time.thread_time(), time.process_time()
                    mc0, f0 = procs.cpu_seconds(moto_pid), minflt()
                    await variants[k]()
                    dt = time.monotonic() - t0
                    moto_s = procs.cpu_seconds(moto_pid) - mc0
                    cpu = ((time.thread_time() - c0) / gb, (time.process_time() - p0) / gb)
                    res[k].append((gb / dt * 1e3, *cpu, moto_s / gb, (minflt() - f0) / gb))
                    await asyncio.sleep(0.2)
            base = statistics.median(x[0] for x in res["plain"])
            print(f"-- {par} in parallel, mallopt={a.mallopt}, {a.rounds} rounds, medians")
            for k, v in res.items():
                med = [statistics.median(x[i] for x in v) for i in range(5)]
                print(f"{k:30} {med[0]:6.0f} MB/s ({med[0] / base:.2f}x)  best {max(x[0] for x in v):6.0f}  "
                      f"main CPU {med[1]:.2f} s/GB  all threads {med[2]:.2f}  moto {med[3]:.2f}  "
                      f"faults/GB {med[4]:.0f}  runs {[round(x[0]) for x in v]}", flush=True)  # fmt: skip


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
