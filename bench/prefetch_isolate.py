"""Investigation only (not a bench): which part of landing a chunk costs the prefetch its gap to a
plain download from moto. The same Prefetcher and S3Store with a host cache that does everything
(hash + write), only hashes, only writes, or drops the bytes; plain downloads between them; each
with moto's CPU seconds per GB. Usage: python -m bench.prefetch_isolate [--runs N] [--par P]"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import boto3

import bench.prefetch as bp
from snapscale.shared import procs
from snapscale.shared.cache import HostCache
from snapscale.shared.chunking import sha256_hex
from snapscale.shared.manifest import Manifest
from snapscale.shared.prefetch import Prefetcher
from snapscale.shared.settings import StoreSettings
from snapscale.shared.store import open_store


class Partial(HostCache):
    """A host cache that skips the hash, the write, or both (bookkeeping as usual)."""

    def __init__(self, root: Path, budget: int, *, hash_: bool, write: bool) -> None:
        super().__init__(root, budget)
        self.hash_, self.write = hash_, write

    def _write_verified(self, digest: str, data: bytes) -> None:
        if self.write:
            if not self.hash_:
                tmp = self.root / "tmp" / digest
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                os.rename(tmp, self.path(digest))
                return
            super()._write_verified(digest, data)
        elif self.hash_:
            sha256_hex(data)


def minflt() -> int:
    """Minor page faults of this process so far (field 10 of /proc/self/stat)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


async def once(ep: str, m: Manifest, work: Path, par: int, hash_: bool, write: bool) -> tuple[float, float]:
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    ss = StoreSettings(f"s3://{bp.BUCKET}/p", endpoint_url=ep, max_concurrency=par)
    async with open_store(ss) as st:
        pf = Prefetcher(st, Partial(cache_dir, 64 << 30, hash_=hash_, write=write), concurrency=par)
        rep = await pf.prefetch(m)
    return rep.throughput_bps / 1e6, 0.0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--par", type=int, default=8)
    ap.add_argument("--mib", type=int, default=1024)
    a = ap.parse_args()
    moto, ep = bp.start_moto()
    work = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        boto3.client("s3", endpoint_url=ep, region_name="us-east-1").create_bucket(Bucket=bp.BUCKET)
        img = work / "image"
        bp.make_image(img, a.mib)
        m, _ = await bp.upload(ep, "p", img, 8 << 20)
        ds = sorted(m.digests())
        gb = m.unique_bytes / 1e9
        best: dict[str, list[float]] = {}
        moto_cpu: dict[str, list[float]] = {}
        faults: dict[str, list[float]] = {}
        variants = [
            ("plain", None),
            ("prefetch: hash+write", (True, True)),
            ("prefetch: hash only", (True, False)),
            ("prefetch: write only", (False, True)),
            ("prefetch: neither", (False, False)),
        ]
        for _ in range(a.runs):
            for name, v in variants:
                c0 = procs.cpu_seconds(moto.pid)
                f0 = minflt()
                if v is None:
                    mb_s = (await bp.plain_download(ep, "p", ds, a.par)).bps / 1e6
                else:
                    mb_s, _ = await once(ep, m, work, a.par, *v)
                best.setdefault(name, []).append(mb_s)
                moto_cpu.setdefault(name, []).append((procs.cpu_seconds(moto.pid) - c0) / gb)
                faults.setdefault(name, []).append((minflt() - f0) / gb)
                await asyncio.sleep(0.2)
        plain = max(best["plain"])
        for name, _v in variants:
            top = max(best[name])
            runs = [round(x) for x in best[name]]
            moto_s, flt = min(moto_cpu[name]), min(faults[name])
            print(f"{name:22} best {top:6.0f} MB/s ({top / plain:.2f}x plain)  runs {runs}  "
                  f"moto CPU s/GB {moto_s:.2f}  our page faults/GB {flt:.0f}", flush=True)  # fmt: skip
    finally:
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
