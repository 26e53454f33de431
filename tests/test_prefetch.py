"""Prefetch and materialize on both stores: a real CRIU image comes back byte for byte; corrupt
chunks are refetched once then reported; concurrent prefetches join; a cancelled or killed
prefetch leaves no partial chunk in the cache."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import filecmp
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from storefix import KEY, image_dir, proxied_store, proxy, store

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.store.assemble import default_workers, materialize
from snapscale.shared.store.backend import ChunkError, ChunkStore
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.checkpoint import fetch_manifest, upload_image
from snapscale.shared.store.chunking import ZERO_CHUNK
from snapscale.shared.store.local import LocalStore
from snapscale.shared.store.manifest import Manifest
from snapscale.shared.store.prefetch import Prefetcher, PrefetchProgress, _Buffers
from snapscale.shared.store.s3 import S3Store

__all__ = ["image_dir", "proxied_store", "proxy", "store"]  # fixtures

CB = 1 << 20


async def uploaded(st: ChunkStore, images: Path, cid: str = "c1") -> tuple[Manifest, str]:
    _m, key, _r = await upload_image(
        st, images, deployment="demo", checkpoint_id=cid, compat={}, compat_hash="h", signing_key=KEY,
        chunk_bytes=CB,
    )  # fmt: skip
    return await fetch_manifest(st, key, KEY), key


def same_tree(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n
        assert (a / n).stat().st_mode == (b / n).stat().st_mode, n


def cache_is_clean(cache: HostCache) -> None:
    """No temp file; every chunk file hashes to its name; the index matches the directory."""
    assert list((cache.root / "tmp").iterdir()) == []
    on_disk = {p.name: p for p in (cache.root / "chunks").iterdir()}
    for name, p in on_disk.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == name
    assert set(on_disk) == set(cache.digests())


GetInto = Callable[[str, memoryview], Awaitable[int]]


@contextlib.contextmanager
def wrapped_gets(st: ChunkStore, wrap: Callable[[GetInto], GetInto]) -> Iterator[None]:
    """The real store's get_chunk_into goes through `wrap(original)` for the block."""
    st.get_chunk_into = wrap(st.get_chunk_into)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del st.get_chunk_into  # the instance attribute: the method shows through again


def first_read_of(
    bad: str, calls: list[int], tamper: Callable[[memoryview, int], int]
) -> Callable[[GetInto], GetInto]:
    """For `wrapped_gets`: the first read of chunk `bad` returns `tamper(buf, n)` (it may change the
    buffer too); `calls` gets the room every read of `bad` had."""

    def wrap(orig: GetInto) -> GetInto:
        async def get(d: str, buf: memoryview) -> int:
            n = await orig(d, buf)
            if d == bad:
                calls.append(len(buf))
                if len(calls) == 1:
                    return tamper(buf, n)
            return n

        return get

    return wrap


def chunks_done(n: int) -> tuple[asyncio.Event, Callable[[PrefetchProgress], None]]:
    """An event set once a prefetch reports `n` chunks done, and the progress callback that sets it."""
    ev = asyncio.Event()

    def progress(p: PrefetchProgress) -> None:
        if p.chunks_done >= n:
            ev.set()

    return ev, progress


@contextlib.contextmanager
def counted_gets(st: ChunkStore) -> Iterator[dict[str, int]]:
    """get_chunk_into calls on the real store by digest, for the block."""
    counts: dict[str, int] = {}

    def wrap(orig: GetInto) -> GetInto:
        async def counting(d: str, buf: memoryview) -> int:
            counts[d] = counts.get(d, 0) + 1
            return await orig(d, buf)

        return counting

    with wrapped_gets(st, wrap):
        yield counts


@pytest.mark.criu
async def test_real_image_round_trip(store: ChunkStore, image_dir: Path, tmp_path: Path) -> None:
    m, _ = await uploaded(store, image_dir)
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(store, cache, concurrency=8)
    seen: list[PrefetchProgress] = []
    rep = await pf.prefetch(m, seen.append)
    assert rep.bytes_fetched == m.unique_bytes == rep.bytes_total and rep.cached_chunks == 0
    assert (
        seen[-1].chunks_done == seen[-1].chunks_total == rep.chunks and seen[-1].bytes_done == m.unique_bytes
    )
    assert all(a.bytes_done <= b.bytes_done for a, b in itertools.pairwise(seen))

    out = tmp_path / "restore"  # same filesystem as the cache: single-chunk files are hard links
    mr = await materialize(cache, m, out)
    same_tree(image_dir, out)
    assert mr.linked_files > 0 and mr.bytes_total == m.total_bytes
    assert mr.zero_bytes == m.zero_bytes
    with pytest.raises(FileExistsError, match="not empty"):
        await materialize(cache, m, out)

    shm = Path("/dev/shm") / f"snapscale-test-{os.getpid()}-{id(store)}"
    try:
        mr2 = await materialize(cache, m, shm)  # tmpfs: copies across filesystems
        same_tree(image_dir, shm)
        assert mr2.linked_files == 0
    finally:
        await asyncio.to_thread(shutil.rmtree, shm, True)

    again = await pf.prefetch(m)
    assert again.cached_chunks == again.chunks and again.bytes_fetched == 0
    cache_is_clean(cache)


@pytest.mark.criu
async def test_materialize_while_chunks_arrive(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.first_byte_s = 0.01
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(proxied_store, cache, concurrency=4)
    task = asyncio.create_task(pf.prefetch(m))
    await materialize(cache, m, tmp_path / "out", arriving=task)
    await task
    same_tree(image_dir, tmp_path / "out")


@pytest.mark.criu
async def test_materialize_beside_prefetch_waits_for_rehash_of_chunks_from_a_past_run(
    store: ChunkStore, image_dir: Path, tmp_path: Path
) -> None:
    """A chunk left corrupt on disk by an earlier run is not copied before the prefetch re-hashes it."""
    m, _ = await uploaded(store, image_dir)
    await Prefetcher(store, HostCache(tmp_path / "cache", 1 << 30)).prefetch(m)
    pages = max(m.files, key=lambda f: f.size)
    victim = [c for c in pages.chunks if c != ZERO_CHUNK][-1]  # copied (not linked), verified last
    p = tmp_path / "cache" / "chunks" / victim
    p.write_bytes(b"\xff" + p.read_bytes()[1:])
    cache = HostCache(tmp_path / "cache", 1 << 30)  # the restarted agent: nothing verified yet
    assert victim in cache and not cache.verified(victim)
    pf = Prefetcher(store, cache, concurrency=1)  # re-hashes one chunk at a time: slower than copies
    task = asyncio.create_task(pf.prefetch(m))
    await materialize(cache, m, tmp_path / "out", arriving=task)
    rep = await task
    assert rep.corrupt_hits == 1 and rep.chunks_fetched == 1
    same_tree(image_dir, tmp_path / "out")


@pytest.mark.criu
async def test_corrupt_chunk_in_store_is_refetched_once_then_reported(
    store: ChunkStore, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    bad = sorted(m.digests())[0]
    rotten = bytearray(await store.get_chunk(bad))
    rotten[len(rotten) // 2] ^= 0x01  # same size, one bit off
    await store.put_chunk(bad, bytes(rotten))
    cache = HostCache(tmp_path / "cache", 1 << 30)
    why = r"corrupt in the store, twice: .* hash to"
    with counted_gets(store) as counts, pytest.raises(ChunkError, match=why) as ei:
        await Prefetcher(store, cache).prefetch(m)
    assert ei.value.digest == bad and counts[bad] == 2
    assert bad not in cache
    cache_is_clean(cache)
    with pytest.raises(ChunkError, match="not in the host cache"):
        await materialize(cache, m, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed materialize leaves nothing half-made


@pytest.mark.criu
async def test_chunk_larger_in_the_store_than_the_manifest_says_is_refetched_once_then_refused(
    store: ChunkStore, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    sizes = m.chunk_sizes()
    bad = max(sizes, key=lambda d: sizes[d])
    await store.put_chunk(bad, os.urandom(sizes[bad] + 1))
    cache = HostCache(tmp_path / "cache", 1 << 30)
    why = f"corrupt in the store, twice: .*{sizes[bad] + 1} bytes, more than the {sizes[bad]} expected"
    with counted_gets(store) as counts, pytest.raises(ChunkError, match=why) as ei:
        await Prefetcher(store, cache).prefetch(m)
    assert ei.value.digest == bad and counts[bad] == 2 and bad not in cache
    cache_is_clean(cache)


@pytest.mark.criu
async def test_chunk_that_arrived_short_is_fetched_again_whole(
    store: ChunkStore, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    sizes = m.chunk_sizes()
    bad = max(sizes, key=lambda d: sizes[d])
    calls: list[int] = []
    short_once = first_read_of(bad, calls, lambda _buf, n: n // 2)  # as if the body ended half-way
    with wrapped_gets(store, short_once):
        rep = await Prefetcher(store, HostCache(tmp_path / "cache", 1 << 30)).prefetch(m)
    assert rep.refetched == 1 and calls == [sizes[bad], sizes[bad]]  # the second read had room for all


async def test_chunk_buffers_are_reused_and_bounded() -> None:
    pool = _Buffers(1024, 2)
    a, b = await pool.take(), await pool.take()
    assert a is not b and len(a) == len(b) == 1024
    third = asyncio.create_task(pool.take())
    await asyncio.sleep(0.01)
    assert not third.done()  # at the limit: waits for a buffer to come back
    pool.give(a)
    assert await third is a
    pool.give(b)
    assert await pool.take() is b


@pytest.mark.criu
async def test_chunk_corrupted_in_flight_is_refetched(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.corrupt_next(1, method="GET")
    cache = HostCache(tmp_path / "cache", 1 << 30)
    rep = await Prefetcher(proxied_store, cache).prefetch(m)
    assert rep.refetched == 1 and rep.bytes_fetched == m.unique_bytes
    cache_is_clean(cache)


@pytest.mark.criu
async def test_checkpoint_bigger_than_the_cache_is_refused_up_front(
    store: ChunkStore, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    cache = HostCache(tmp_path / "cache", m.unique_bytes - 1)
    with counted_gets(store) as counts, pytest.raises(ConfigError, match="SNAPSCALE_CACHE_BYTES"):
        await Prefetcher(store, cache).prefetch(m)
    assert counts == {} and len(cache) == 0


@pytest.mark.criu
async def test_corrupt_cached_chunk_is_dropped_and_refetched(
    store: ChunkStore, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(store, cache)
    await pf.prefetch(m)
    victim = sorted(m.digests())[-1]
    p = cache.path(victim)
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    rep = await pf.prefetch(m)
    assert rep.corrupt_hits == 1 and rep.chunks_fetched == 1
    assert rep.bytes_fetched == m.chunk_sizes()[victim]
    cache_is_clean(cache)


@pytest.mark.criu
async def test_second_prefetch_joins_the_first(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.first_byte_s = 0.02
    gets_before = proxy.stats.by_method.get("GET", 0)
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(proxied_store, cache, concurrency=4)
    a, b = await asyncio.gather(pf.prefetch(m), pf.prefetch(m))
    assert proxy.stats.by_method["GET"] - gets_before == len(m.digests())
    assert not a.joined and b.joined and a.bytes_fetched == b.bytes_fetched == m.unique_bytes
    assert pf.running() == []


@pytest.mark.criu
async def test_cancelled_prefetch_leaves_no_partial_chunk(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.first_byte_s = 0.01
    proxy.bytes_per_s = 8e6  # ~0.13 s a chunk a connection: a prefetch of seconds
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(proxied_store, cache, concurrency=4)
    started, progress = chunks_done(2)
    first = asyncio.create_task(pf.prefetch(m, progress))
    joiner = asyncio.create_task(pf.prefetch(m))
    await asyncio.wait_for(started.wait(), 20)
    joiner.cancel()  # one of two waiters leaves: the download goes on
    with pytest.raises(asyncio.CancelledError):
        await joiner
    assert pf.running() == ["demo/c1"]
    first.cancel()  # the last waiter leaves: the download stops
    with pytest.raises(asyncio.CancelledError):
        await first
    assert pf.running() == []
    assert 0 < len(cache) < len(m.digests())
    cache_is_clean(cache)
    # What did arrive is usable: a new prefetch fetches only the rest.
    proxy.bytes_per_s = None
    rep = await pf.prefetch(m)
    assert rep.cached_chunks > 0 and rep.cached_chunks + rep.chunks_fetched == rep.chunks


KILLED_CHILD = r"""
import asyncio, sys
from dataclasses import replace
from pathlib import Path
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.chunking import ZERO_CHUNK
from snapscale.shared.store.checkpoint import fetch_manifest
from snapscale.shared.store.prefetch import Prefetcher
from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.store.backend import open_store

async def main():
    url, endpoint, key, cache_dir = sys.argv[1:5]
    async with open_store(StoreSettings(url, endpoint_url=endpoint, max_concurrency=4)) as st:
        m = await fetch_manifest(st, key, b"test-signing-key")
        def progress(p):
            print(p.chunks_done, flush=True)
        await Prefetcher(st, HostCache(Path(cache_dir), 1 << 30), concurrency=4).prefetch(m, progress)
asyncio.run(main())
"""


@pytest.mark.criu
async def test_killed_prefetch_process_leaves_no_partial_chunk(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    m, key = await uploaded(proxied_store, image_dir)
    proxy.bytes_per_s = 8e6
    url = f"s3://{proxied_store.bucket}/{proxied_store.prefix}"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CHILD, url, proxy.url, key, str(tmp_path / "cache"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    while True:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line, "the child ended before it made progress"
        if int(line) >= 2:
            break
    child.send_signal(signal.SIGKILL)
    await child.wait()
    cache = HostCache(tmp_path / "cache", 1 << 30)  # the restarted agent
    assert 0 < len(cache) < len(m.digests())
    cache_is_clean(cache)


def open_files_under(d: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(d)):
            out.append(target)
    return out


@pytest.mark.criu
async def test_cancelled_materialize_leaves_no_dir_and_no_open_file(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.bytes_per_s = 8e6  # chunks trickle in; materialize waits on them
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(proxied_store, cache, concurrency=2)
    some_in, progress = chunks_done(3)
    fetching = asyncio.create_task(pf.prefetch(m, progress))
    out = tmp_path / "out"
    building = asyncio.create_task(materialize(cache, m, out, arriving=fetching))
    await asyncio.wait_for(some_in.wait(), 20)
    building.cancel()
    with pytest.raises(asyncio.CancelledError):
        await building
    assert not out.exists()
    assert open_files_under(out) == []  # every image file closed (the dir is gone: "(deleted)")
    fetching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetching
    cache_is_clean(cache)


def test_materialize_copies_with_a_thread_a_core_from_4_to_16(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, want in ((2, 4), (16, 16), (128, 16), (None, 4)):
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert default_workers() == want


@pytest.mark.criu
async def test_a_slow_landing_does_not_hold_up_the_next_downloads(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path
) -> None:
    """The first chunk's hash-and-write is held back: both workers must keep downloading the
    rest meanwhile (a worker used to wait for its previous chunk to land before its next GET)."""
    m, _ = await uploaded(proxied_store, image_dir)
    assert len(m.digests()) >= 6
    proxy.first_byte_s = 0.05
    release = asyncio.Event()
    held: list[str] = []

    class FirstLandsLate(HostCache):
        async def insert(self, digest: str, data: bytes | memoryview, *, hashed: bool = False) -> None:
            if not held:
                held.append(digest)
            if digest == held[0]:
                await release.wait()
            await super().insert(digest, data, hashed=hashed)

    in_flight = 0
    at_start: list[int] = []  # GETs in flight as each one starts, itself included
    all_in = asyncio.Event()

    def counting(orig: GetInto) -> GetInto:
        async def get(d: str, buf: memoryview) -> int:
            nonlocal in_flight
            in_flight += 1
            at_start.append(in_flight)
            try:
                return await orig(d, buf)
            finally:
                in_flight -= 1
                if in_flight == 0 and len(at_start) == len(m.digests()):
                    all_in.set()

        return get

    with wrapped_gets(proxied_store, counting):
        cache = FirstLandsLate(tmp_path / "cache", 1 << 30)
        task = asyncio.create_task(Prefetcher(proxied_store, cache, concurrency=2).prefetch(m))
        await asyncio.wait_for(all_in.wait(), 30)
        assert not task.done()  # every chunk is in, one still waits to land
        # Both workers went on downloading (a worker waiting on its landing leaves one GET at a time).
        later = at_start[3:]
        assert later.count(2) >= len(later) - 2, at_start
        release.set()
        rep = await task
    assert rep.chunks_fetched == len(m.digests())
    cache_is_clean(cache)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (mounting needs root, like CRIU: the tests using it are marked `criu`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={CB}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.criu
async def test_materialize_into_a_full_tmpfs_says_no_space(tmp_path: Path, small_tmpfs: Path) -> None:
    """Chunks are read into a shared mapping of the big file; on a full filesystem that read fails
    with EFAULT ('Bad address'). The range is reserved first, so the operator reads ENOSPC (the
    restore falls back to a cold boot), and the partial directory is removed."""
    images = tmp_path / "image"
    images.mkdir()
    (images / "pages-1.img").write_bytes(os.urandom(3 * CB))  # three chunks: the mapped path
    st = LocalStore(tmp_path / "store")
    m, _ = await uploaded(st, images)
    cache = HostCache(tmp_path / "cache", 1 << 30)
    await Prefetcher(st, cache).prefetch(m)
    with pytest.raises(OSError, match="No space left") as e:
        await materialize(cache, m, small_tmpfs / "img")
    assert e.value.errno == errno.ENOSPC
    assert not (small_tmpfs / "img").exists()
    await materialize(cache, m, tmp_path / "img")  # with room it is the same image
    same_tree(images, tmp_path / "img")
