"""The chunk store interface: content-addressed chunks and signed manifests, on S3 or a local dir.

Key layout (both backends): `chunks/<sha256>`, `manifests/<deployment>/<checkpoint-id>.json`.
Backends move bytes; they never interpret a manifest or check a digest (callers do).
"""

from __future__ import annotations

import abc
import asyncio
import posixpath
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from snapscale.shared.core import errors
from snapscale.shared.core.errors import ConfigError, RetryableError, SnapscaleError
from snapscale.shared.core.settings import StoreSettings
from snapscale.shared.store.chunking import is_digest

T = TypeVar("T")

CHUNKS = "chunks/"
MANIFESTS = "manifests/"


class StoreError(SnapscaleError):
    """The store refused or failed an operation for good (denied, bad request, retries used up)."""


class RetryableStoreError(RetryableError, StoreError):
    """The store failed in a way that may pass (5xx, throttling, a dropped connection)."""


class NotFoundError(StoreError, errors.NotFoundError):
    """The key does not exist."""

    def __init__(self, key: str) -> None:
        super().__init__(f"not in the store: {key}")
        self.key = key


class TooBigError(StoreError):
    """An object is larger than the buffer it was to be read into."""


class ChunkError(SnapscaleError):
    """A chunk's bytes do not hash to its name (corrupt in the store or in the cache)."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"chunk {digest[:16]}: {reason}")
        self.digest = digest
        self.reason = reason


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch; GC's grace period is measured against it


def chunk_key(digest: str) -> str:
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return CHUNKS + digest


def manifest_key(deployment: str, checkpoint_id: str) -> str:
    for name, v in (("deployment", deployment), ("checkpoint_id", checkpoint_id)):
        if not v or "/" in v or v in (".", "..") or "\0" in v:
            raise ValueError(f"{name} {v!r} cannot be part of a store key")
    return f"{MANIFESTS}{deployment}/{checkpoint_id}.json"


def check_key(key: str) -> str:
    """Refuse keys that could leave the store's root (the local backend maps keys to paths)."""
    if not key or key.startswith("/") or posixpath.normpath(key) != key or ".." in key.split("/"):
        raise ValueError(f"bad store key {key!r}")
    return key


class ChunkStore(abc.ABC):
    """Async object store with chunk and manifest helpers. Use through `open_store`."""

    description: str

    # -- the five object operations a backend provides --
    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Write `data` durably under `key`; on return a reader sees all of it."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """All bytes of `key`, or `NotFoundError`."""

    async def get_into(self, key: str, buf: memoryview) -> int:
        """Read `key` into the front of `buf`; how many bytes. `TooBigError` if it does not fit.
        Backends that can stream (S3) read straight into `buf` and allocate nothing."""
        data = await self.get(key)
        if len(data) > len(buf):
            raise TooBigError(f"{key}: {len(data)} bytes, more than the {len(buf)} expected")
        buf[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    async def touch(self, key: str) -> bool:
        """Refresh `key`'s mtime if it exists (so GC's grace period restarts); False if absent."""

    @abc.abstractmethod
    def iter_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Objects whose key starts with `prefix`, in key order."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; absent is fine."""

    async def close(self) -> None:  # noqa: B027 - backends without connections need nothing
        """Release connections."""

    async def sweep_temp(self, older_than_s: float) -> int:
        """Remove what crashed writers left behind; how many. Only the local store has any."""
        return 0

    # -- chunks and manifests --
    async def put_chunk(self, digest: str, data: bytes) -> None:
        await self.put(chunk_key(digest), data)

    async def get_chunk(self, digest: str) -> bytes:
        return await self.get(chunk_key(digest))

    async def get_chunk_into(self, digest: str, buf: memoryview) -> int:
        """The chunk read into the front of `buf` (sized to the chunk as the manifest says); a
        chunk larger than that is corrupt: `ChunkError`."""
        try:
            return await self.get_into(chunk_key(digest), buf)
        except TooBigError as e:
            raise ChunkError(digest, str(e)) from None

    async def touch_chunk(self, digest: str) -> bool:
        return await self.touch(chunk_key(digest))

    async def delete_chunk(self, digest: str) -> None:
        await self.delete(chunk_key(digest))

    async def list_chunks(self) -> AsyncIterator[ObjectInfo]:
        async for o in self.iter_objects(CHUNKS):
            name = o.key[len(CHUNKS) :]
            if is_digest(name):
                yield ObjectInfo(name, o.size, o.mtime)

    async def put_manifest(self, key: str, data: bytes) -> None:
        await self.put(check_manifest_key(key), data)

    async def get_manifest(self, key: str) -> bytes:
        return await self.get(check_manifest_key(key))

    async def list_manifests(self, deployment: str | None = None) -> list[ObjectInfo]:
        if deployment is not None:
            manifest_key(deployment, "x")  # refuses a deployment name that could leave the root
        prefix = MANIFESTS if deployment is None else f"{MANIFESTS}{deployment}/"
        return [o async for o in self.iter_objects(prefix) if o.key.endswith(".json")]


def check_manifest_key(key: str) -> str:
    check_key(key)
    if not key.startswith(MANIFESTS) or not key.endswith(".json"):
        raise ValueError(f"not a manifest key: {key!r}")
    return key


@asynccontextmanager
async def open_store(settings: StoreSettings) -> AsyncIterator[ChunkStore]:
    """The configured store, open for the block (S3 keeps one client and its pool for it)."""
    store: ChunkStore
    if settings.scheme == "file":
        from snapscale.shared.store.local import LocalStore

        store = LocalStore(settings.local_path)
    elif settings.scheme == "s3":
        from snapscale.shared.store.s3 import S3Store

        store = await S3Store.open(settings)
    else:
        raise ConfigError(f"unknown store scheme in {settings.url!r}")
    try:
        yield store
    finally:
        await store.close()


async def run_bounded(items: Iterable[T], fn: Callable[[T], Awaitable[None]], concurrency: int) -> None:
    """`fn(item)` for every item, at most `concurrency` at once; the first error cancels the rest
    and is raised as itself (not wrapped in an ExceptionGroup)."""
    it = iter(items)

    async def worker() -> None:
        for item in it:  # workers share one iterator, so each item is taken once
            await fn(item)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, concurrency)):
                tg.create_task(worker())
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
