"""The cold path's two ways side by side in one run: the old one (prefetch into the host cache, the
file store read through `get` + a copy on the event loop, materialize copying each chunk from the
cache into the image as it arrives) against landing (the store read straight into the prefetch's
buffer, each chunk written from it into the image once it hashed right, and into the cache from the
same buffer). On the file store a third way in between: the old path with the store's new reads, so
the two changes show apart. Each round starts from an empty host cache and a fresh image dir; the
ways alternate (ABC CBA); medians reported. Then what a fetched chunk's steps cost per GB on one
thread, and how late the event loop ran meanwhile (what a restore beside the prefetch waits on).

Usage: python -m bench.landing [--mib 1024] [--rounds 4] [--store file|s3|both] [--image-root /dev/shm]
[--work /var/tmp] [--json OUT]. The time that counts is "image ready": when materialize returns
(a restore starts CRIU then); "prefetch done" adds the cache writes still in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import bench.prefetch as bp
from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.store.assemble import materialize
from snapscale.shared.store.backend import ChunkStore, open_store
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.checkpoint import fetch_manifest, upload_image
from snapscale.shared.store.landing import ImageSink
from snapscale.shared.store.local import LocalStore
from snapscale.shared.store.manifest import Manifest
from snapscale.shared.store.prefetch import Prefetcher

GB = 1e9
# (name, landing, the file store's old reads)
WAYS = (
    ("old: prefetch, then copy from the cache", False, True),
    ("old, with the file store's new reads", False, False),
    ("landing: written from the prefetch's buffer", True, False),
)


@dataclass(frozen=True)
class Run:
    way: str
    image_s: float  # until materialize returned: the image is complete
    prefetch_s: float  # until the prefetch returned: every chunk cached too
    cpu_s: float  # this process, all threads
    landed: int
    copied: int
    loop_late_s: float  # how late 5 ms ticks on the event loop woke, summed: what a restore beside it waits


@contextlib.contextmanager
def old_file_reads(st: ChunkStore, on: bool) -> Iterator[None]:
    """The file store as it read before landing: a fresh `bytes` a chunk, copied on the loop."""
    if on and isinstance(st, LocalStore):
        st.get_into = lambda key, buf: ChunkStore.get_into(st, key, buf)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if on and isinstance(st, LocalStore):
            del st.get_into


async def ticking(late: list[float]) -> None:
    """Sleep 5 ms at a time; add up how late each wake-up came (the loop busy with something else)."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.005)
        late.append(max(0.0, time.monotonic() - t - 0.005))


async def one(st: ChunkStore, m: Manifest, work: Path, image_root: Path, way: int) -> Run:
    name, landing, old_reads = WAYS[way]
    cache_dir, img = work / "cache", image_root / f"snapscale-landing-bench-{os.getpid()}"
    for d in (cache_dir, img):
        await asyncio.to_thread(shutil.rmtree, d, True)
    cache = HostCache(cache_dir, 64 << 30)
    sink = ImageSink() if landing else None
    late: list[float] = []
    tick = asyncio.create_task(ticking(late))
    c0, t0 = time.process_time(), time.monotonic()
    with old_file_reads(st, old_reads):
        fetch = asyncio.create_task(Prefetcher(st, cache).prefetch(m, sink=sink))
        made = await materialize(cache, m, img, arriving=fetch, sink=sink)
        image_s = time.monotonic() - t0
        await fetch
    tick.cancel()
    run = Run(name, image_s, time.monotonic() - t0, time.process_time() - c0,
              made.landed_bytes, made.copied_bytes, sum(late))  # fmt: skip
    await asyncio.to_thread(shutil.rmtree, img, True)
    return run


def steps_per_gb(m: Manifest, store_root: Path, work: Path, image_root: Path) -> dict[str, float]:
    """Seconds per GB of each step of a fetched chunk's way, on one thread (the image's chunks):
    read from the file store into a buffer, SHA-256, write a cache file, copy into a tmpfs mapping."""
    import mmap

    digests = sorted(m.digests())
    sizes = m.chunk_sizes()
    total = sum(sizes[d] for d in digests)
    buf = bytearray(max(sizes.values()))
    out: dict[str, float] = {}
    t = time.monotonic()
    for d in digests:
        with open(store_root / "chunks" / d, "rb") as f:
            f.readinto(buf)
    out["read from the file store (page cache)"] = (time.monotonic() - t) / (total / GB)
    t = time.monotonic()
    for d in digests:
        hashlib.sha256(memoryview(buf)[: sizes[d]]).hexdigest()
    out["sha256"] = (time.monotonic() - t) / (total / GB)
    scratch = work / "steps"
    scratch.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    for d in digests:
        (scratch / d).write_bytes(memoryview(buf)[: sizes[d]])
    out["write a cache file"] = (time.monotonic() - t) / (total / GB)
    shutil.rmtree(scratch, ignore_errors=True)
    path = image_root / f"snapscale-landing-steps-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, total)
        with mmap.mmap(fd, total) as mm:
            t = time.monotonic()
            at = 0
            for d in digests:
                mm[at : at + sizes[d]] = memoryview(buf)[: sizes[d]]
                at += sizes[d]
            out["copy into a tmpfs mapping"] = (time.monotonic() - t) / (total / GB)
    finally:
        os.close(fd)
        path.unlink()
    return out


async def bench_store(
    st: ChunkStore, img: Path, work: Path, args: argparse.Namespace
) -> tuple[Manifest, list[Run]]:
    _m, key, _r = await upload_image(
        st, img, deployment="bench", checkpoint_id="landing", compat={}, compat_hash="h", signing_key=bp.KEY
    )  # fmt: skip
    m = await fetch_manifest(st, key, bp.KEY)
    runs: list[Run] = []
    for r in range(args.rounds):
        ways = range(len(WAYS)) if st_reads_differ(st) else (0, 2)
        for way in ways if r % 2 == 0 else reversed(ways):
            run = await one(st, m, work, Path(args.image_root), way)
            runs.append(run)
            print(f"  {run.way}: image {run.image_s:.3f}s, prefetch {run.prefetch_s:.3f}s, "
                  f"cpu {run.cpu_s:.2f}s, loop late {run.loop_late_s:.3f}s, "
                  f"landed {run.landed / 1e6:.0f} MB, copied {run.copied / 1e6:.0f} MB",
                  flush=True)  # fmt: skip
    return m, runs


def st_reads_differ(st: ChunkStore) -> bool:
    """Only the file store reads differently now; S3 read straight into the buffers before."""
    return isinstance(st, LocalStore)


def summary(name: str, m: Manifest, runs: list[Run]) -> dict[str, object]:
    gb = m.unique_bytes / GB
    rows: dict[str, dict[str, float]] = {}
    for way, _, _ in WAYS:
        rs = [r for r in runs if r.way == way]
        if not rs:
            continue
        rows[way] = {
            "image_s": statistics.median(r.image_s for r in rs),
            "prefetch_s": statistics.median(r.prefetch_s for r in rs),
            "image_s_per_gb": statistics.median(r.image_s for r in rs) / gb,
            "cpu_s_per_gb": statistics.median(r.cpu_s for r in rs) / gb,
            "loop_late_s": statistics.median(r.loop_late_s for r in rs),
        }
    old, new = rows[WAYS[0][0]], rows[WAYS[2][0]]
    ratio = old["image_s"] / new["image_s"] if new["image_s"] > 0 else 0.0
    print(f"\n{name}: {m.unique_bytes / 1e6:.0f} MB to fetch, medians of {len(runs) // len(rows)} rounds")
    print("| way | image ready s | prefetch done s | image s/GB | CPU s/GB | event loop late s |")
    print("|---|---:|---:|---:|---:|---:|")
    for way, row in rows.items():
        print(f"| {way} | {row['image_s']:.3f} | {row['prefetch_s']:.3f} | {row['image_s_per_gb']:.3f} | "
              f"{row['cpu_s_per_gb']:.2f} | {row['loop_late_s']:.3f} |")  # fmt: skip
    print(f"old / landing (image ready): **{ratio:.2f}x**")
    return {"store": name, "bytes": m.unique_bytes, "rows": rows, "old_over_landing": ratio,
            "runs": [asdict(r) for r in runs]}  # fmt: skip


async def main(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(dir=args.work, prefix="snapscale-landing-"))
    out: dict[str, object] = {"mib": args.mib, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    try:
        img = work / "image"
        bp.make_image(img, args.mib)
        results = []
        if args.store in ("file", "both"):
            print(
                f"file store under {work} (image dir {args.image_root}, cache {work / 'cache'})", flush=True
            )
            st = LocalStore(work / "store")
            m, runs = await bench_store(st, img, work, args)
            results.append(summary("file store", m, runs))
            out["steps_s_per_gb"] = steps = steps_per_gb(m, work / "store", work, Path(args.image_root))
            print("\none thread, per GB: " + ", ".join(f"{k} {v:.3f} s" for k, v in steps.items()))
        if args.store in ("s3", "both"):
            moto, ep = bp.start_moto()
            try:
                os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
                os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
                import boto3

                boto3.client("s3", endpoint_url=ep, region_name="us-east-1").create_bucket(Bucket=bp.BUCKET)
                ss = StoreSettings(f"s3://{bp.BUCKET}/p", endpoint_url=ep, max_concurrency=16)
                async with open_store(ss) as s3:
                    print(f"\nmoto's S3 server at {ep}", flush=True)
                    m, runs = await bench_store(s3, img, work, args)
                    results.append(summary("S3 (moto on loopback)", m, runs))
            finally:
                moto.terminate()
        out["results"] = results
        out["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="image size (10%% of its 8 MiB chunks zero)")
    ap.add_argument("--rounds", type=int, default=4, help="each round runs both ways (ABBA)")
    ap.add_argument("--store", choices=("file", "s3", "both"), default="file")
    ap.add_argument(
        "--image-root", default="/dev/shm", help="where the image is assembled (a tmpfs on GPU hosts)"
    )
    ap.add_argument(
        "--work", default="/var/tmp", help="store and host cache (disk, as the e2e bench has them)"
    )
    ap.add_argument("--json", default="", help="write the numbers here too")
    return ap.parse_args()


if __name__ == "__main__":
    a = parse()
    res = asyncio.run(main(a))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
