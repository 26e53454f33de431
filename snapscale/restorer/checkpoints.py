"""The restorer's access to checkpoints: verified manifests (kept for the inventory), the host
cache's share of each, prefetch and materialize with the chunks pinned for the whole restore.

A thin layer over the shared store, cache, prefetcher and materializer; no chunk code of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapscale.shared.store import (
    ChunkStore,
    HostCache,
    ImageSink,
    Manifest,
    Prefetcher,
    fetch_manifest,
    materialize,
)

log = logging.getLogger(__name__)
KNOWN_MAX = 256  # manifests remembered for the inventory


@dataclass(frozen=True)
class Fetched:
    bytes_fetched: int
    chunks: int
    cached_chunks: int
    cached_bytes: int
    seconds: float
    joined: bool = False  # this restore waited on a prefetch of the same checkpoint already running


@dataclass(frozen=True)
class Placed:
    """How a materialize filled the image: bytes the prefetch wrote there, bytes copied from the cache."""

    landed_bytes: int
    copied_bytes: int


class Checkpoints:
    def __init__(self, store: ChunkStore, cache: HostCache, signing_key: bytes) -> None:
        self.store = store
        self.cache = cache
        self.signing_key = signing_key
        self.prefetcher = Prefetcher(store, cache)
        self.known: dict[str, Manifest] = {}  # checkpoint id -> manifest, for the heartbeat

    async def manifest(self, key: str) -> Manifest:
        """The verified manifest at `key`, read from the store every time (it may be replaced)."""
        m = await fetch_manifest(self.store, key, self.signing_key)
        self.known[m.checkpoint_id] = m
        while len(self.known) > KNOWN_MAX:
            self.known.pop(next(iter(self.known)))
        return m

    def cached(self, m: Manifest) -> tuple[int, int]:
        """(bytes of `m`'s chunks in the cache, bytes it needs), zero chunks excluded."""
        sizes = m.chunk_sizes()
        return sum(s for d, s in sizes.items() if d in self.cache), sum(sizes.values())

    def inventory(self) -> dict[str, tuple[int, int]]:
        return {cid: self.cached(m) for cid, m in self.known.items()}

    @contextlib.contextmanager
    def pinned(self, m: Manifest) -> Iterator[None]:
        """Keep `m`'s chunks from eviction between prefetch and the end of materialize."""
        with self.cache.pinned(m.digests()):
            yield

    async def prefetch(self, m: Manifest, sink: ImageSink | None = None) -> Fetched:
        """With `sink`, the chunks it fetches land in the image being materialized, too."""
        rep = await self.prefetcher.prefetch(m, sink=sink)
        return Fetched(
            rep.bytes_fetched, rep.chunks, rep.cached_chunks, rep.cached_bytes, rep.duration_s, rep.joined
        )

    async def materialize(
        self,
        m: Manifest,
        dest: Path,
        *,
        arriving: asyncio.Future[Any] | None = None,
        sink: ImageSink | None = None,
    ) -> Placed:
        """With `arriving` (a running prefetch), chunks are placed as they land; with `sink` (given
        to that prefetch), those it fetches are written into the image by the prefetch itself."""
        rep = await materialize(self.cache, m, dest, arriving=arriving, sink=sink)
        return Placed(rep.landed_bytes, rep.copied_bytes)
