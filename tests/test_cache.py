"""The host cache: verify before insert, LRU eviction under a byte budget that never touches a
pinned chunk, corrupt entries dropped, and the index rebuilt from the directory on restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.store.backend import ChunkError
from snapscale.shared.store.cache import CHUNK_MODE, CacheFullError, HostCache


def chunk(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([i % 256]) * size
    return hashlib.sha256(data).hexdigest(), data


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


async def test_insert_verifies_before_anything_lands(tmp_path: Path) -> None:
    c = HostCache(tmp_path, 10_000)
    d, data = chunk(1)
    with pytest.raises(ChunkError, match="hash to"):
        await c.insert(d, data + b"x")
    assert d not in c and c.used_bytes == 0
    assert files_in(tmp_path / "chunks") == [] and files_in(tmp_path / "tmp") == []
    await c.insert(d, data)
    assert d in c and c.used_bytes == 1000
    assert (tmp_path / "chunks" / d).stat().st_mode & 0o7777 == CHUNK_MODE
    assert await c.read(d) == data


async def test_lru_eviction_never_evicts_a_pinned_chunk(tmp_path: Path) -> None:
    c = HostCache(tmp_path, 3000)  # room for three 1000-byte chunks
    ds = [chunk(i) for i in range(6)]
    for d, data in ds[:3]:
        await c.insert(d, data)
    c.pin([ds[0][0]])  # the oldest, but in use by a restore
    c.use(ds[1][0])  # a hit: now the newest
    await c.insert(*ds[3])
    assert ds[2][0] not in c  # the least recently used unpinned chunk went
    assert ds[0][0] in c and ds[1][0] in c and ds[3][0] in c
    assert c.used_bytes == 3000 and c.evicted == 1
    with c.pinned([d for d, _ in ds[:6]]):  # pins may name chunks not cached yet
        with pytest.raises(CacheFullError, match="pinned"):
            await c.insert(*ds[4])
        assert ds[4][0] not in c and c.used_bytes == 3000
    assert c.is_pinned(ds[0][0]) and not c.is_pinned(ds[1][0])
    for _ in range(5):  # churn: whatever comes, the pinned chunk stays
        for d, data in ds[1:]:
            await c.insert(d, data)
        assert ds[0][0] in c and c.used_bytes <= 3000
    c.unpin([ds[0][0]])
    await c.insert(*chunk(100))
    await c.insert(*chunk(101))
    await c.insert(*chunk(102))
    assert ds[0][0] not in c
    assert sorted(files_in(tmp_path / "chunks")) == sorted(c.digests())


async def test_concurrent_inserts_stay_within_budget(tmp_path: Path) -> None:
    c = HostCache(tmp_path, 5000)
    await asyncio.gather(*(c.insert(*chunk(i)) for i in range(20)))
    assert c.used_bytes <= 5000
    assert sum((tmp_path / "chunks" / d).stat().st_size for d in c.digests()) == c.used_bytes


async def test_corrupt_entry_is_dropped_on_verify(tmp_path: Path) -> None:
    c = HostCache(tmp_path, 10_000)
    d, data = chunk(7)
    await c.insert(d, data)
    assert await c.verify(d)
    p = tmp_path / "chunks" / d
    p.write_bytes(b"\0" + data[1:])
    assert not await c.verify(d)
    assert d not in c and not p.exists() and c.dropped_corrupt == 1 and c.used_bytes == 0


async def test_index_is_rebuilt_from_the_directory(tmp_path: Path) -> None:
    c = HostCache(tmp_path, 10_000)
    ds = [chunk(i) for i in range(4)]
    for d, data in ds:
        await c.insert(d, data)
    for i, (d, _) in enumerate(ds):  # last use: chunk 2 oldest, then 0, 3, 1
        os.utime(tmp_path / "chunks" / d, (1000.0 + [1, 3, 0, 2][i], 1000.0 + [1, 3, 0, 2][i]))
    (tmp_path / "tmp" / "partial.123").write_bytes(b"half a chunk")  # a killed writer's leftover
    (tmp_path / "chunks" / "not-a-digest").write_bytes(b"?")
    again = HostCache(tmp_path, 10_000)
    assert again.digests() == [ds[2][0], ds[0][0], ds[3][0], ds[1][0]]
    assert again.used_bytes == 4000
    assert files_in(tmp_path / "tmp") == []
    assert "not-a-digest" not in files_in(tmp_path / "chunks")
    smaller = HostCache(tmp_path, 2000)
    await smaller.insert(*chunk(50))  # must evict the two least recently used
    assert ds[2][0] not in smaller and ds[0][0] not in smaller and ds[3][0] not in smaller


async def test_a_chunk_bigger_than_the_budget_is_a_config_error(tmp_path: Path) -> None:
    c = HostCache(tmp_path, 500)
    with pytest.raises(ConfigError, match="SNAPSCALE_CACHE_BYTES"):
        await c.insert(*chunk(1))


def test_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        HostCache(tmp_path, 0)
