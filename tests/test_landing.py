"""Chunks that land straight in the image (store/landing.py): on a cold or partly cold host cache the
prefetch writes each chunk it fetched and hashed into the image materialize is building, from its own
buffer, and caches it from the same buffer; materialize copies only what came from the cache. Both
stores, a real CRIU image, moto's S3 server."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from storefix import image_dir, proxied_store, proxy, store
from test_prefetch import (
    CB,
    cache_is_clean,
    chunks_done,
    counted_gets,
    first_read_of,
    open_files_under,
    same_tree,
    small_tmpfs,
    uploaded,
    wrapped_gets,
)

from snapscale.shared.store.assemble import MaterializeReport, materialize
from snapscale.shared.store.backend import ChunkError, ChunkStore
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.chunking import ZERO_CHUNK, chunk_length
from snapscale.shared.store.landing import ImageSink
from snapscale.shared.store.local import LocalStore
from snapscale.shared.store.manifest import Manifest
from snapscale.shared.store.prefetch import Prefetcher, PrefetchReport
from snapscale.shared.store.s3 import S3Store

__all__ = ["image_dir", "proxied_store", "proxy", "small_tmpfs", "store"]  # fixtures

pytestmark = pytest.mark.criu


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A fresh image dir on tmpfs, as on a GPU host (another filesystem than the cache: no links)."""
    d = Path("/dev/shm") / f"snapscale-landing-{os.getpid()}-{tmp_path.name}"
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nonzero_bytes(m: Manifest, digests: set[str] | None = None) -> int:
    """Bytes of the image's non-zero chunks (every place each one goes), of `digests` only if given."""
    return sum(
        chunk_length(f.size, m.chunk_bytes, i)
        for f in m.files
        for i, d in enumerate(f.chunks)
        if d != ZERO_CHUNK and (digests is None or d in digests)
    )


class Recording(ImageSink):
    """An ImageSink that remembers the SHA-256 of every chunk written into the image."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[tuple[str, str]] = []

    def write(self, digest: str, data: memoryview) -> None:
        self.written.append((digest, hashlib.sha256(data).hexdigest()))
        super().write(digest, data)


async def restore_cold(
    pf: Prefetcher, cache: HostCache, m: Manifest, out: Path, sink: ImageSink | None = None
) -> tuple[PrefetchReport, MaterializeReport]:
    """The restorer's cold path: prefetch with a sink, materialize beside it."""
    sink = sink if sink is not None else ImageSink()
    fetch = asyncio.create_task(pf.prefetch(m, sink=sink))
    try:
        made = await materialize(cache, m, out, arriving=fetch, sink=sink)
    finally:
        if not fetch.done():
            await asyncio.wait([fetch])
    return await fetch, made


async def test_fetched_chunks_land_in_the_image_without_a_copy(
    store: ChunkStore, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    cache = HostCache(tmp_path / "cache", 1 << 30)
    sink = Recording()
    got, made = await restore_cold(Prefetcher(store, cache, concurrency=4), cache, m, shm, sink)
    same_tree(image_dir, shm)  # byte for byte the frozen image
    assert made.copied_bytes == 0 and made.linked_files == 0
    assert made.landed_bytes == nonzero_bytes(m) > 0
    assert got.bytes_fetched == m.unique_bytes and got.chunks_fetched == len(m.digests())
    assert all(d == h for d, h in sink.written)  # only chunks that hashed to their names
    assert {d for d, _ in sink.written} == m.digests()
    cache_is_clean(cache)  # and the cache has every one, from the same buffers
    assert set(cache.digests()) == m.digests() and all(cache.verified(d) for d in m.digests())


async def test_partly_cold_cache_lands_the_fetched_and_copies_the_cached(
    store: ChunkStore, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    await Prefetcher(store, HostCache(tmp_path / "cache", 1 << 30)).prefetch(m)
    gone = set(sorted(m.digests())[::2])
    for d in gone:
        (tmp_path / "cache" / "chunks" / d).unlink()
    cache = HostCache(tmp_path / "cache", 1 << 30)  # a restarted agent: the rest is re-hashed first
    with counted_gets(store) as gets:
        got, made = await restore_cold(Prefetcher(store, cache, concurrency=4), cache, m, shm)
    same_tree(image_dir, shm)
    assert set(gets) == gone and got.cached_chunks == len(m.digests()) - len(gone)
    assert made.landed_bytes == nonzero_bytes(m, gone)
    assert made.copied_bytes == nonzero_bytes(m, m.digests() - gone)
    cache_is_clean(cache)


async def test_chunk_corrupted_in_flight_never_reaches_the_image(
    store: ChunkStore, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    sizes = m.chunk_sizes()
    bad = max(sizes, key=lambda d: sizes[d])
    seen: list[int] = []

    def rot(buf: memoryview, n: int) -> int:
        buf[n // 2] ^= 0x01  # one bit off, as a bad read would leave it
        return n

    cache = HostCache(tmp_path / "cache", 1 << 30)
    sink = Recording()
    with wrapped_gets(store, first_read_of(bad, seen, rot)):
        got, made = await restore_cold(Prefetcher(store, cache), cache, m, shm, sink)
    assert got.refetched == 1 and len(seen) == 2
    assert [h for d, h in sink.written if d == bad] == [bad]  # written once: the good copy
    same_tree(image_dir, shm)
    assert made.copied_bytes == 0


async def test_chunk_corrupt_in_the_store_fails_the_image_and_leaves_none(
    store: ChunkStore, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    m, _ = await uploaded(store, image_dir)
    bad = sorted(m.digests())[0]
    rotten = bytearray(await store.get_chunk(bad))
    rotten[len(rotten) // 2] ^= 0x01
    await store.put_chunk(bad, bytes(rotten))
    cache = HostCache(tmp_path / "cache", 1 << 30)
    sink = Recording()
    with pytest.raises(ChunkError, match="corrupt in the store, twice") as e:
        await restore_cold(Prefetcher(store, cache), cache, m, shm, sink)
    assert e.value.digest == bad and bad not in cache
    assert bad not in {d for d, _ in sink.written}
    assert not await asyncio.to_thread(shm.exists)
    cache_is_clean(cache)


async def test_a_restore_joining_a_running_prefetch_gets_its_image_landed_too(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    """The scaler's prefetch at zero is running when the restore comes: one download, and the chunks
    still to come land in the restore's image; those already in are copied from the cache."""
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.bytes_per_s = 16e6
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(proxied_store, cache, concurrency=2)
    some_in, progress = chunks_done(2)
    gets_before = proxy.stats.by_method.get("GET", 0)
    first = asyncio.create_task(pf.prefetch(m, progress))
    await asyncio.wait_for(some_in.wait(), 20)
    got, made = await restore_cold(pf, cache, m, shm)
    await first
    assert got.joined and proxy.stats.by_method["GET"] - gets_before == len(m.digests())
    same_tree(image_dir, shm)
    assert made.landed_bytes > 0 and made.copied_bytes > 0
    assert made.landed_bytes + made.copied_bytes == nonzero_bytes(m)


async def test_cancelled_cold_restore_leaves_no_image_no_open_file_and_a_clean_cache(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.bytes_per_s = 8e6
    cache = HostCache(tmp_path / "cache", 1 << 30)
    some_in, progress = chunks_done(3)
    sink = ImageSink()
    fetching = asyncio.create_task(
        Prefetcher(proxied_store, cache, concurrency=2).prefetch(m, progress, sink)
    )
    building = asyncio.create_task(materialize(cache, m, shm, arriving=fetching, sink=sink))
    await asyncio.wait_for(some_in.wait(), 20)
    building.cancel()
    fetching.cancel()
    for t in (building, fetching):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert not await asyncio.to_thread(shm.exists) and open_files_under(shm) == []
    cache_is_clean(cache)


async def test_no_room_for_the_image_fails_it_while_the_cache_gets_every_chunk(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    """A full image filesystem says ENOSPC (the range is reserved before the chunk is copied into
    the mapping, where it would be a SIGBUS); the prefetch goes on caching."""
    images = tmp_path / "image"
    images.mkdir()
    (images / "pages-1.img").write_bytes(os.urandom(3 * CB))
    st = LocalStore(tmp_path / "store")
    m, _ = await uploaded(st, images)
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(st, cache)
    sink = ImageSink()
    fetch = asyncio.create_task(pf.prefetch(m, sink=sink))
    with pytest.raises(OSError, match="No space left") as e:
        await materialize(cache, m, small_tmpfs / "img", arriving=fetch, sink=sink)
    assert e.value.errno == errno.ENOSPC and not (small_tmpfs / "img").exists()
    rep = await fetch
    assert rep.chunks_fetched == len(m.digests()) and set(cache.digests()) == m.digests()
    cache_is_clean(cache)


async def test_one_of_two_restores_on_one_download_cancelled_leaves_the_other_whole(
    proxied_store: S3Store, proxy: FaultProxy, image_dir: Path, tmp_path: Path, shm: Path
) -> None:
    """Two restores of one checkpoint share a download, each with its image; the first is cancelled
    mid-way (its chunks may be being written): its image goes, with every file closed, and the
    second's comes out whole."""
    m, _ = await uploaded(proxied_store, image_dir)
    proxy.bytes_per_s = 8e6
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(proxied_store, cache, concurrency=2)
    some_in, progress = chunks_done(2)
    a_sink, a_dir, b_dir = ImageSink(), shm / "a", shm / "b"
    a_fetch = asyncio.create_task(pf.prefetch(m, progress, a_sink))
    a_build = asyncio.create_task(materialize(cache, m, a_dir, arriving=a_fetch, sink=a_sink))
    b = asyncio.create_task(restore_cold(pf, cache, m, b_dir))
    await asyncio.wait_for(some_in.wait(), 20)
    for t in (a_build, a_fetch):
        t.cancel()
    for t in (a_build, a_fetch):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert not await asyncio.to_thread(a_dir.exists) and open_files_under(a_dir) == []
    _, made = await b
    same_tree(image_dir, b_dir)
    assert made.landed_bytes > 0 and made.landed_bytes + made.copied_bytes == nonzero_bytes(m)
    cache_is_clean(cache)
