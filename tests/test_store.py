"""Chunk stores (local directory and moto's S3) and checkpoints in them: objects, upload with
dedup, verify, GC with its grace period, and S3 faults injected at the HTTP level."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from storefix import FAST_RETRY, KEY, image_dir, proxied_store, proxy, store

from snapscale.shared.core.settings import Settings, StoreSettings
from snapscale.shared.store import checkpoint as ck
from snapscale.shared.store.backend import (
    ChunkError,
    ChunkStore,
    NotFoundError,
    ObjectInfo,
    RetryableStoreError,
    StoreError,
    manifest_key,
)
from snapscale.shared.store.checkpoint import collect_garbage, plan_gc, upload_image, verify_checkpoint
from snapscale.shared.store.httpget import GetterStats
from snapscale.shared.store.local import LocalStore
from snapscale.shared.store.manifest import ManifestError
from snapscale.shared.store.s3 import RetryPolicy, S3Store, proxied

__all__ = ["image_dir", "proxied_store", "proxy", "store"]  # fixtures


def direct_stats(st: S3Store) -> GetterStats | None:
    """(A call, so that mypy does not carry an earlier check of the property past an await.)"""
    return st.direct_stats


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir())


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def upload(
    st: ChunkStore, images: Path, cid: str, chunk_bytes: int = 1 << 20
) -> tuple[str, ck.UploadReport]:
    _m, key, rep = await upload_image(
        st, images, deployment="demo", checkpoint_id=cid, compat={"criu": "4.2.1"}, compat_hash="h1",
        signing_key=KEY, timings_s={"dump": 0.1}, chunk_bytes=chunk_bytes,
    )  # fmt: skip
    return key, rep


async def test_objects_round_trip(store: ChunkStore) -> None:
    data = os.urandom(3000)
    d = digest(data)
    assert not await store.touch_chunk(d)
    await store.put_chunk(d, data)
    assert await store.get_chunk(d) == data
    assert await store.touch_chunk(d)
    listed = [o async for o in store.list_chunks()]
    assert [(o.key, o.size) for o in listed] == [(d, 3000)]
    assert abs(listed[0].mtime - time.time()) < 60
    await store.put_manifest(manifest_key("demo", "c1"), b"{}")
    assert [o.key for o in await store.list_manifests("demo")] == ["manifests/demo/c1.json"]
    assert await store.list_manifests("other") == []
    await store.delete_chunk(d)
    await store.delete_chunk(d)  # absent is fine
    with pytest.raises(NotFoundError):
        await store.get_chunk(d)


async def test_chunk_read_into_a_buffer(store: ChunkStore) -> None:
    data = os.urandom(300_000)
    d = digest(data)
    await store.put_chunk(d, data)
    buf = bytearray(b"x" * (len(data) + 10))
    assert await store.get_chunk_into(d, memoryview(buf)) == len(data)
    assert buf[: len(data)] == data and buf[len(data) :] == b"x" * 10
    # A chunk larger than the manifest says is corrupt, said so, and nothing is left half-read.
    with pytest.raises(ChunkError, match=f"{len(data)} bytes, more than the {len(data) - 1} expected"):
        await store.get_chunk_into(d, memoryview(bytearray(len(data) - 1)))
    assert await store.get_chunk(d) == data  # (S3) the connection pool is healthy afterwards
    with pytest.raises(NotFoundError):
        await store.get_chunk_into("0" * 64, memoryview(buf))


async def test_s3_body_cut_mid_way_is_read_again_from_the_start(
    proxied_store: S3Store, proxy: FaultProxy
) -> None:
    data = os.urandom(2_000_000)
    d = digest(data)
    await proxied_store.put_chunk(d, data)
    proxy.cut_next(2, method="GET")
    buf = bytearray(len(data))
    assert await proxied_store.get_chunk_into(d, memoryview(buf)) == len(data)
    assert buf == data
    assert proxy.stats.injected == 2 and proxied_store.retries == 2


async def test_keys_cannot_escape(store: ChunkStore) -> None:
    with pytest.raises(ValueError, match="not a sha256"):
        await store.get_chunk("../../etc/passwd")
    with pytest.raises(ValueError, match="cannot be part"):
        manifest_key("..", "x")
    with pytest.raises(ValueError, match="bad store key"):
        await store.get_manifest("manifests/../chunks/x.json")
    with pytest.raises(ValueError, match="cannot be part"):
        await store.list_manifests("../..")


async def test_touch_refreshes_mtime(settings_store_local: LocalStore) -> None:
    st = settings_store_local
    data = b"x" * 10
    await st.put_chunk(digest(data), data)
    p = st.root / "chunks" / digest(data)
    os.utime(p, (1000.0, 1000.0))
    assert await st.touch_chunk(digest(data))
    assert p.stat().st_mtime > time.time() - 60


@pytest.fixture
def settings_store_local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "lstore")


@pytest.mark.criu
async def test_upload_then_dedup(store: ChunkStore, image_dir: Path) -> None:
    key, first = await upload(store, image_dir, "c1")
    assert first.total_bytes == dir_bytes(image_dir)
    assert first.zero_bytes >= 6 << 20  # the child's 8 MiB of touched zero pages, chunk-aligned part
    assert first.new_bytes == first.unique_bytes > 0
    assert first.new_chunks == first.chunks
    stored = {o.key: o.size async for o in store.list_chunks()}
    assert sum(stored.values()) == first.unique_bytes
    m = await ck.fetch_manifest(store, key, KEY)
    assert m.digests() == set(stored)
    assert m.new_bytes == first.new_bytes and m.timings_s["dump"] == 0.1

    _key2, second = await upload(store, image_dir, "c2")
    assert second.new_bytes == 0 and second.new_chunks == 0
    assert second.unique_bytes == first.unique_bytes
    assert {o.key async for o in store.list_chunks()} == set(stored)
    assert len(await store.list_manifests("demo")) == 2


@pytest.mark.criu
async def test_verify_finds_missing_and_corrupt_chunks(store: ChunkStore, image_dir: Path) -> None:
    key, _ = await upload(store, image_dir, "c1")
    m = await ck.fetch_manifest(store, key, KEY)
    assert (await verify_checkpoint(store, m)).ok
    a, b, *_ = sorted(m.digests())
    await store.delete_chunk(a)
    await store.put_chunk(b, b"not the right bytes")
    rep = await verify_checkpoint(store, m)
    assert rep.missing == [a] and rep.corrupt == [b] and not rep.ok
    shallow = await verify_checkpoint(store, m, deep=False)
    assert shallow.missing == [a] and shallow.corrupt == []


def test_plan_gc_table() -> None:
    now = 10_000.0
    chunks = [
        ObjectInfo("ref", 10, 0.0),  # referenced: kept however old
        ObjectInfo("old", 20, now - 7200),  # unreferenced and old: deleted
        ObjectInfo("young", 30, now - 60),  # unreferenced, maybe a freeze in flight: kept
        ObjectInfo("edge", 40, now - 3600),  # exactly at the grace: deleted
    ]
    plan = plan_gc(chunks, {"ref"}, now=now, grace_s=3600)
    assert plan.delete == ["old", "edge"]
    assert (plan.kept_referenced, plan.kept_young, plan.bytes_freed) == (1, 1, 60)


@pytest.mark.criu
async def test_gc_deletes_only_old_unreferenced_chunks(store: ChunkStore, image_dir: Path) -> None:
    key, _ = await upload(store, image_dir, "c1")
    orphan = os.urandom(100)
    await store.put_chunk(digest(orphan), orphan)
    plan = await collect_garbage(store, KEY, grace_s=3600)
    assert plan.delete == [] and plan.kept_young == 1
    plan = await collect_garbage(store, KEY, grace_s=0, dry_run=True)
    assert plan.delete == [digest(orphan)]
    assert await store.touch_chunk(digest(orphan))  # dry run deleted nothing
    plan = await collect_garbage(store, KEY, grace_s=0)
    assert plan.delete == [digest(orphan)] and plan.bytes_freed == 100
    assert not await store.touch_chunk(digest(orphan))
    m = await ck.fetch_manifest(store, key, KEY)
    assert (await verify_checkpoint(store, m)).ok


async def test_gc_refuses_to_run_past_an_unreadable_manifest(store: ChunkStore) -> None:
    orphan = b"orphan"
    await store.put_chunk(digest(orphan), orphan)
    await store.put_manifest(manifest_key("demo", "bad"), b'{"manifest": {}, "signature": {"hmac": "00"}}')
    with pytest.raises(StoreError, match="GC stopped"):
        await collect_garbage(store, KEY, grace_s=0)
    assert await store.touch_chunk(digest(orphan))


@pytest.mark.criu
async def test_upload_puts_back_chunks_a_concurrent_gc_removed(store: ChunkStore, image_dir: Path) -> None:
    """The race GC's grace period cannot close alone: chunks vanish after upload touched them."""
    key, _ = await upload(store, image_dir, "c1")
    m = await ck.fetch_manifest(store, key, KEY)
    victim = sorted(m.digests())[0]

    # The real store, with a GC's delete of `victim` landing right after the upload touched it.
    racing = store
    orig_touch = store.touch_chunk
    fired = False

    async def touch_then_lose(d: str) -> bool:
        nonlocal fired
        ok = await orig_touch(d)
        if d == victim and not fired:
            fired = True
            await store.delete_chunk(d)
        return ok

    racing.touch_chunk = touch_then_lose  # type: ignore[method-assign,assignment]
    try:
        _k, rep = await upload(racing, image_dir, "c2")
    finally:
        del racing.touch_chunk
    assert fired and rep.new_chunks == 1
    assert (await verify_checkpoint(store, m)).ok


async def test_upload_without_signing_key_is_refused(store: ChunkStore, tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.img").write_bytes(b"a")
    with pytest.raises(ManifestError, match="signing key"):
        await upload_image(
            store,
            tmp_path / "img",
            deployment="d",
            checkpoint_id="c",
            compat={},
            compat_hash="h",
            signing_key=b"",
        )


async def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    st = LocalStore(tmp_path / "s")
    await asyncio.gather(*(st.put_chunk(digest(bytes([i]) * 1000), bytes([i]) * 1000) for i in range(50)))
    assert list((tmp_path / "s" / ".tmp").iterdir()) == []
    assert len([o async for o in st.list_chunks()]) == 50
    # What a writer killed mid-put leaves: GC removes it once it is older than the grace period.
    old, young = tmp_path / "s" / ".tmp" / "x.old", tmp_path / "s" / ".tmp" / "x.young"
    old.write_bytes(b"half")
    young.write_bytes(b"half")
    os.utime(old, (1000.0, 1000.0))
    await collect_garbage(st, KEY, grace_s=3600)
    assert not old.exists() and young.exists()
    assert len([o async for o in st.list_chunks()]) == 50  # unreferenced but young: kept


async def test_s3_errors_for_a_while_are_retried(proxied_store: S3Store, proxy: FaultProxy) -> None:
    data = os.urandom(5000)
    d = digest(data)
    proxy.fail_for(0.4, status=503, code=b"SlowDown")
    t0 = time.monotonic()
    await proxied_store.put_chunk(d, data)
    assert time.monotonic() - t0 >= 0.35
    assert proxy.stats.injected >= 2 and proxied_store.retries >= 2
    proxy.fail_next(3, status=500, code=b"InternalError", method="GET")
    proxy.reset_next(2, method="GET")
    assert await proxied_store.get_chunk(d) == data


async def test_s3_errors_that_persist_fail_cleanly(proxied_store: S3Store, proxy: FaultProxy) -> None:
    proxied_store.retry = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05)
    proxy.fail_for(60, status=503)
    t0 = time.monotonic()
    with pytest.raises(RetryableStoreError, match="after 3 tries"):
        await proxied_store.get_chunk("a" * 64)
    assert time.monotonic() - t0 < 5 and proxy.stats.injected == 3
    proxy.clear()
    proxy.fail_next(1, status=403, code=b"AccessDenied")
    with pytest.raises(StoreError, match="AccessDenied") as ei:
        await proxied_store.get_chunk("a" * 64)
    assert not isinstance(ei.value, RetryableStoreError)  # a denial is not retried
    assert proxy.stats.injected == 4
    # The pool is healthy afterwards: bodies of the failed calls were read or closed.
    data = b"after"
    await proxied_store.put_chunk(digest(data), data)
    assert await proxied_store.get_chunk(digest(data)) == data


def test_store_settings_urls() -> None:
    s = StoreSettings.parse("s3://bucket/some/prefix")
    assert (s.bucket, s.prefix) == ("bucket", "some/prefix")


async def test_s3_request_rate_and_concurrency_are_bounded(s3_settings: Settings, proxy: FaultProxy) -> None:
    """max_requests_per_s throttles; max_concurrency bounds requests in flight (seen at the proxy)."""
    ss = replace(s3_settings.store, endpoint_url=proxy.url, max_concurrency=3, max_requests_per_s=20)
    proxy.first_byte_s = 0.02  # unthrottled, 30 requests 3 at a time would take ~0.2 s
    st = await S3Store.open(ss, FAST_RETRY)
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(st.touch_chunk(digest(bytes([i]))) for i in range(30)))
        elapsed = time.monotonic() - t0
    finally:
        await st.close()
    assert proxy.stats.requests == 30
    assert elapsed >= 0.9  # 30 requests at 20/s: the last 10 wait for the first second to pass
    assert proxy.stats.max_in_flight <= 3


async def test_s3_chunk_gets_read_straight_into_the_buffer_over_kept_connections(
    proxied_store: S3Store, proxy: FaultProxy
) -> None:
    """Chunk GETs go by presigned URL through httpget (the proxy keeps connections open, as a
    remote object store does); its errors are retried, refused or not found like aioboto3's."""
    chunks = [os.urandom(n) for n in (10, 300_000, 2_000_000)]
    for c in chunks:
        await proxied_store.put_chunk(digest(c), c)
    stats = proxied_store.direct_stats
    assert stats is not None
    for c in chunks:
        buf = bytearray(len(c))
        assert await proxied_store.get_chunk_into(digest(c), memoryview(buf)) == len(c) and buf == c
    assert (stats.requests, stats.connections, stats.reused) == (3, 1, 2)
    proxy.fail_next(2, status=503, code=b"SlowDown", method="GET")
    buf = bytearray(10)
    assert await proxied_store.get_chunk_into(digest(chunks[0]), memoryview(buf)) == 10
    assert proxied_store.retries == 2 and buf == chunks[0]
    proxy.fail_next(1, status=403, code=b"AccessDenied", method="GET")
    with pytest.raises(StoreError, match="HTTP 403 AccessDenied") as ei:
        await proxied_store.get_chunk_into(digest(chunks[0]), memoryview(buf))
    assert not isinstance(ei.value, RetryableStoreError) and proxied_store.retries == 2
    with pytest.raises(NotFoundError):
        await proxied_store.get_chunk_into("b" * 64, memoryview(buf))
    assert direct_stats(proxied_store) is stats  # still on
    # Signed for the wrong region: aioboto3, which follows S3's redirect to the bucket's region,
    # reads this chunk and those after it.
    proxy.fail_next(1, status=400, code=b"AuthorizationQueryParametersError", method="GET")
    assert await proxied_store.get_chunk_into(digest(chunks[0]), memoryview(buf)) == 10
    assert direct_stats(proxied_store) is None and buf == chunks[0]


async def test_s3_direct_gets_give_way_to_aioboto3_for_a_body_they_cannot_read(
    s3_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that sends bodies chunked: the direct GET says so once, and the chunk still
    arrives, read by aioboto3 (aiohttp reads chunked bodies)."""
    gets = 0

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal gets
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                gets += 1
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    st = await S3Store.open(replace(s3_settings.store, endpoint_url=f"http://127.0.0.1:{port}"), FAST_RETRY)
    try:
        for _ in range(2):
            buf = bytearray(8)
            assert await st.get_chunk_into("c" * 64, memoryview(buf)) == 5 and buf[:5] == b"hello"
            assert st.direct_stats is None
    finally:
        await st.close()
        server.close()
    assert gets == 3  # one direct GET, then aioboto3 for both
    assert [r.getMessage() for r in caplog.records if "direct GETs off" in r.getMessage()] == [
        f"S3 direct GETs off for {st.description} (a 200 without a Content-Length (chunked or to the end "
        "of the stream)); chunks go through aioboto3"
    ]


def test_direct_gets_stay_off_where_the_environment_sets_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    assert not proxied("http://s3.internal:9000/b/k?sig=1")
    monkeypatch.setenv("HTTP_PROXY", "http://user:secret@proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert proxied("http://s3.internal:9000/b/k?sig=1")
    assert not proxied("http://127.0.0.1:9000/b/k?sig=1")
    assert not proxied("https://s3.internal/b/k")  # HTTPS_PROXY unset


async def test_s3_chunk_gets_take_the_environments_proxy_through_aioboto3(
    s3_settings: Settings, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("http_proxy", "https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # the fault proxy forwards absolute-URI requests too
    st = await S3Store.open(s3_settings.store, FAST_RETRY)
    try:
        data = os.urandom(1000)
        await st.put_chunk(digest(data), data)
        buf = bytearray(1000)
        assert await st.get_chunk_into(digest(data), memoryview(buf)) == 1000 and buf == data
        assert st.direct_stats is None
    finally:
        await st.close()
    assert proxy.stats.by_method == {"PUT": 1, "GET": 1}
