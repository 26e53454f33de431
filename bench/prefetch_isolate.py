"""Investigation only (not a bench): which part of landing a chunk costs the prefetch its gap to a
plain download from moto. The same Prefetcher and S3Store with a host cache that does everything
(hash + write), only hashes, only writes, or drops the bytes; plain downloads between them; each
with moto's CPU seconds per GB. Usage: python -m bench.prefetch_isolate [--runs N] [--par P]"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from pathlib import Path

import aioboto3
from aiobotocore.config import AioConfig

import bench.prefetch as bp
from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.engine import procs
from snapscale.shared.store.backend import chunk_key, open_store
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.chunking import sha256_hex


class Partial(HostCache):
    """A host cache that skips the hash, the write, or both (bookkeeping as usual)."""

    def __init__(self, root: Path, budget: int, *, hash_: bool, write: bool) -> None:
        super().__init__(root, budget)
        self.hash_, self.write = hash_, write

    def _write_verified(self, digest: str, data: bytes | memoryview) -> None:
        if self.hash_ and self.write:
            super()._write_verified(digest, data)  # the real thing
        elif self.hash_:
            sha256_hex(data)
        elif self.write:
            self._write_chunk(digest, data)  # the cache's own write, without the hash


def minflt() -> int:
    """Minor page faults of this process so far (field 10 of /proc/self/stat)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


async def worker_loop(ep: str, ds: list[str], par: int) -> float:
    """`par` workers pulling digests from one iterator, each GET through S3Store.get_chunk."""
    ss = StoreSettings(f"s3://{bp.BUCKET}/p", endpoint_url=ep, max_concurrency=par)
    async with open_store(ss) as st:
        it = iter(ds)
        total = 0

        async def worker() -> None:
            nonlocal total
            for d in it:
                n = len(await st.get_chunk(d))
                total += n  # not `total += len(await ...)`: that reads `total` before awaiting

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(par)))
        return total / (time.monotonic() - t0) / 1e6


async def store_loop(ep: str, ds: list[str], par: int) -> float:
    """The plain loop (gather under a semaphore), each GET through S3Store.get_chunk."""
    ss = StoreSettings(f"s3://{bp.BUCKET}/p", endpoint_url=ep, max_concurrency=par)
    async with open_store(ss) as st:
        sem = asyncio.Semaphore(par)
        total = 0

        async def one(d: str) -> None:
            nonlocal total
            async with sem:
                data = await st.get_chunk(d)
            total += len(data)

        t0 = time.monotonic()
        await asyncio.gather(*(one(d) for d in ds))
        return total / (time.monotonic() - t0) / 1e6


async def plain_store_config(ep: str, ds: list[str], par: int) -> float:
    """The plain loop with the client S3Store.open builds (its retry mode and timeouts)."""
    cfg = AioConfig(
        max_pool_connections=par,
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    async with aioboto3.Session().client("s3", endpoint_url=ep, region_name="us-east-1", config=cfg) as s3:
        sem = asyncio.Semaphore(par)
        total = 0

        async def one(d: str) -> None:
            nonlocal total
            async with sem:
                r = await s3.get_object(Bucket=bp.BUCKET, Key=f"p/{chunk_key(d)}")
                async with r["Body"] as body:
                    data = await body.read()
            total += len(data)

        t0 = time.monotonic()
        await asyncio.gather(*(one(d) for d in ds))
        return total / (time.monotonic() - t0) / 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--par", type=int, default=8)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--structure", action="store_true", help="loop shape and key order instead of landing")
    a = ap.parse_args()
    async with bp.moto_with_image(a.mib) as (moto_pid, ep, m, work):
        ds = sorted(m.digests())
        gb = m.unique_bytes / 1e9
        best: dict[str, list[float]] = {}
        moto_cpu: dict[str, list[float]] = {}
        faults: dict[str, list[float]] = {}
        in_file_order = list(dict.fromkeys(c for f in m.files for c in f.chunks if c in m.chunk_sizes()))
        structure: list[tuple[str, object]] = [
            ("plain", None),
            ("gather via S3Store.get, sorted", ("loop", False)),
            ("gather via S3Store.get, file order", ("loop", True)),
            ("workers via S3Store.get, sorted", ("workers", False)),
            ("workers via S3Store.get, file order", ("workers", True)),
            ("prefetch: neither (file order)", (False, False)),
        ]
        variants: list[tuple[str, object]] = [
            ("plain", None),
            ("prefetch: hash+write", (True, True)),
            ("prefetch: hash only", (True, False)),
            ("prefetch: write only", (False, True)),
            ("prefetch: neither", (False, False)),
            ("plain, S3Store's client config", "cfg"),
            ("plain loop via S3Store.get", "store"),
        ]
        if a.structure:
            variants = structure
        for _ in range(a.runs):
            for name, v in variants:
                c0 = procs.cpu_seconds(moto_pid)
                f0 = minflt()
                if v is None:
                    mb_s = (await bp.plain_download(ep, "p", ds, a.par)).bps / 1e6
                elif v == "cfg":
                    mb_s = await plain_store_config(ep, ds, a.par)
                elif v == "store":
                    mb_s = await store_loop(ep, ds, a.par)
                elif isinstance(v, tuple) and v[0] in ("loop", "workers"):
                    keys = in_file_order if v[1] else ds
                    shape = store_loop if v[0] == "loop" else worker_loop
                    mb_s = await shape(ep, keys, a.par)
                else:
                    assert isinstance(v, tuple)
                    h, w = bool(v[0]), bool(v[1])
                    cache = functools.partial(Partial, hash_=h, write=w)
                    mb_s = (await bp.prefetch_once(ep, "p", m, work, a.par, cache)).bps / 1e6
                best.setdefault(name, []).append(mb_s)
                moto_cpu.setdefault(name, []).append((procs.cpu_seconds(moto_pid) - c0) / gb)
                faults.setdefault(name, []).append((minflt() - f0) / gb)
                await asyncio.sleep(0.2)
        plain = max(best["plain"])
        for name, _v in variants:
            top = max(best[name])
            runs = [round(x) for x in best[name]]
            moto_s, flt = min(moto_cpu[name]), min(faults[name])
            print(f"{name:32} best {top:6.0f} MB/s ({top / plain:.2f}x plain)  runs {runs}  "
                  f"moto CPU s/GB {moto_s:.2f}  our page faults/GB {flt:.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
