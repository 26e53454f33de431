"""A restore with nothing of its checkpoint in the host cache rebuilds the image while the chunks
arrive (materialize starts before prefetch ends), each fetched chunk written into the image by the
prefetch itself (none copied from the cache); with chunks cached already it waits for the prefetch,
which re-hashes them before they are trusted. Real nats-server, CRIU, the CPU sample."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from engine_helpers import kill_tagged
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from restorer_harness import Harness, follow, get, running

from snapscale.shared import bus
from snapscale.shared.bus.messages import ReplicaState, Tier
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.store.chunking import ZERO_CHUNK

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"rovl-{uuid.uuid4().hex[:10]}"
    harness = Harness(settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


def _phases(exp: InMemorySpanExporter, replica: str) -> dict[str, ReadableSpan]:
    """The prefetch and materialize spans of `replica`'s scale-up (children of its root)."""
    done = exp.get_finished_spans()
    root = next(
        s for s in done if s.name == "scale_up" and (s.attributes or {}).get("snapscale.replica") == replica
    )
    assert root.context is not None
    kids = [s for s in done if s.parent is not None and s.parent.span_id == root.context.span_id]
    return {s.name: s for s in kids if s.name in ("prefetch", "materialize")}


async def test_cold_cache_restore_materializes_while_chunks_arrive(
    h: Harness, spans: InMemorySpanExporter
) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    async with running(h.settings, h.criu, hot_images=0):
        await h.restore(spec.name, "a")
        a = await h.wait("a")
        assert a.state is ReplicaState.READY and a.tier is Tier.STORE, a.reason
        assert await get(a.endpoint, "/generate") == frozen.answer
        assert a.bytes["landed"] > 0 and a.bytes["copied"] == 0, a.bytes
        await h.restore(spec.name, "b")
        b = await h.wait("b")
        assert b.state is ReplicaState.READY and b.tier is Tier.CACHE, b.reason
        assert await get(b.endpoint, "/generate") == frozen.answer
        assert b.bytes["landed"] == 0, b.bytes
    pa, pb = _phases(spans, "a"), _phases(spans, "b")
    assert pa.keys() == pb.keys() == {"prefetch", "materialize"}
    # cold cache: side by side; warm cache: one after the other
    assert pa["materialize"].start_time is not None and pa["prefetch"].end_time is not None
    assert pa["materialize"].start_time < pa["prefetch"].end_time
    assert pb["materialize"].start_time is not None and pb["prefetch"].end_time is not None
    assert pb["materialize"].start_time >= pb["prefetch"].end_time


async def test_partly_cold_cache_restore_lands_the_missing_chunks_and_copies_the_rest(h: Harness) -> None:
    """Some of the checkpoint's chunks gone from the cache (found so by a restarted restorer): the
    restore takes the store tier, overlaps as a cold one does, the missing chunks land in the image
    and only the cached ones are copied."""
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    async with running(h.settings, h.criu, hot_images=0):
        await h.restore(spec.name, "a")
        assert (await h.wait("a")).tier is Tier.STORE
    chunks = h.settings.cache_dir / "chunks"
    # Half of the chunks of files made of several (a file of one chunk is linked to the cache, not
    # landed): a choice by digest alone could take only such small files' chunks.
    several = {c for f in frozen.manifest.files if len(f.chunks) > 1 for c in f.chunks if c != ZERO_CHUNK}
    assert len(several) >= 2, frozen.manifest.files
    gone = sorted(several)[::2]
    for d in gone:
        (chunks / d).unlink()
    async with running(h.settings, h.criu, hot_images=0):
        await h.restore(spec.name, "b")
        b = await h.wait("b")
        assert b.state is ReplicaState.READY and b.tier is Tier.STORE, b.reason
        assert await get(b.endpoint, "/generate") == frozen.answer
    sizes = frozen.manifest.chunk_sizes()
    assert b.bytes["fetched"] == sum(sizes[d] for d in gone), b.bytes
    assert b.bytes["landed"] > 0 and b.bytes["copied"] > 0, b.bytes
