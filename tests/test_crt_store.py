"""bench/crt_store.py, the awscrt variant that bench/prefetch.py runs beside httpget: it must land
a chunk's exact bytes in the caller's buffer, and fail the way the store's own GET does (a missing
chunk is not found, a chunk larger than the manifest says is corrupt), or its numbers compare
nothing. The dev extra installs awscrt."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("awscrt")

from bench.crt_store import CrtS3Store, open_crt_store
from snapscale.shared.core.settings import Settings
from snapscale.shared.store.backend import ChunkError, NotFoundError

PART = 1 << 20


@pytest.fixture
async def crt(s3_settings: Settings) -> AsyncIterator[CrtS3Store]:
    async with open_crt_store(s3_settings.store, PART) as st:
        yield st


async def test_a_chunk_lands_in_the_buffer_byte_for_byte(crt: CrtS3Store) -> None:
    data = os.urandom(PART - 123)
    d = hashlib.sha256(data).hexdigest()
    await crt.put_chunk(d, data)
    buf = bytearray(PART)
    n = await crt.get_chunk_into(d, memoryview(buf)[: len(data)])
    assert n == len(data) and bytes(buf[:n]) == data


async def test_missing_and_too_big_fail_as_the_store_does(crt: CrtS3Store) -> None:
    with pytest.raises(NotFoundError):
        await crt.get_chunk_into("0" * 64, memoryview(bytearray(16)))
    data = os.urandom(4096)
    d = hashlib.sha256(data).hexdigest()
    await crt.put_chunk(d, data)
    with pytest.raises(ChunkError, match="more than"):
        await crt.get_chunk_into(d, memoryview(bytearray(1000)))
