"""Hot images: the second restore of a checkpoint reuses the image dir the first one assembled (no
prefetch, no materialize copy), a hot image that fails is dropped and rebuilt, and eviction keeps
at most `keep` without touching one being read. Real nats-server, CRIU and the CPU sample."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from engine_helpers import kill_tagged
from restorer_harness import Harness, follow, get, running

from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.hot import HotImages
from snapscale.shared import bus
from snapscale.shared.bus.messages import ReplicaState, Tier
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary


@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"rhot-{uuid.uuid4().hex[:10]}"
    harness = Harness(settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


def _work(h: Harness) -> Path:
    return h.settings.state_dir / "restorer"


@pytest.mark.criu
async def test_second_restore_reuses_the_assembled_image(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    cid = frozen.entry.checkpoint_id
    async with running(h.settings, h.criu, cpu_slots=8):
        await h.restore(spec.name, "a")
        a = await h.wait("a")
        assert a.state is ReplicaState.READY and a.tier is Tier.STORE, a.reason
        assert "hot" not in a.bytes and "prefetch" in a.timings_s
        hot = _work(h) / "hot" / cid
        assert (hot / "snapscale-engine.json").exists()  # kept, not deleted after CRIU read it
        assert list((_work(h) / "images").iterdir()) == []

        await h.restore(spec.name, "b")
        b = await h.wait("b")
        assert b.state is ReplicaState.READY and b.tier is Tier.CACHE, b.reason
        assert b.bytes["hot"] == frozen.manifest.total_bytes and b.bytes["fetched"] == 0
        assert "prefetch" not in b.timings_s and b.timings_s["materialize"] < 0.05
        assert await get(b.endpoint, "/generate") == frozen.answer
        assert await get(a.endpoint, "/generate") == frozen.answer  # both serve, from one image

        # two restores reading the one hot image at once
        await asyncio.gather(h.restore(spec.name, "b2"), h.restore(spec.name, "b3"))
        for r in ("b2", "b3"):
            ev = await h.wait(r)
            assert ev.state is ReplicaState.READY and "hot" in ev.bytes, ev.reason
            assert await get(ev.endpoint, "/generate") == frozen.answer

        # a hot image that no longer restores is dropped: a cold boot now, a fresh assembly next
        (hot / "pstree.img").unlink()  # a link into the cache: the cached chunk stays intact
        await h.restore(spec.name, "c")
        c = await h.wait("c")
        assert c.state is ReplicaState.READY and c.tier is Tier.COLD
        assert "criu_restore" in c.reason, c.reason
        assert not hot.exists()
        await h.restore(spec.name, "d")
        d = await h.wait("d")
        assert d.state is ReplicaState.READY and d.tier is Tier.CACHE, d.reason
        assert "hot" not in d.bytes and "prefetch" in d.timings_s
        assert await get(d.endpoint, "/generate") == frozen.answer
        assert (hot / "pstree.img").exists()


@pytest.mark.criu
async def test_hot_images_off_assembles_every_time(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    await h.make_checkpoint(spec)
    async with running(h.settings, h.criu, hot_images=0):
        for r in ("a", "b"):
            await h.restore(spec.name, r)
            ev = await h.wait(r)
            assert ev.state is ReplicaState.READY, ev.reason
            assert "hot" not in ev.bytes and "prefetch" in ev.timings_s
        assert not (_work(h) / "hot").exists()
        assert list((_work(h) / "images").iterdir()) == []


def _image(root: Path, name: str) -> Path:
    d = root / "scratch" / name
    d.mkdir(parents=True)
    (d / "pages-1.img").write_bytes(b"x")
    return d


def test_eviction_keeps_the_newest_and_never_one_being_read(tmp_path: Path) -> None:
    hot = HotImages(tmp_path / "hot", keep=1)
    assert hot.adopt("c1", _image(tmp_path, "1"))
    assert not hot.adopt("c1", _image(tmp_path, "1b"))  # one per checkpoint: the caller deletes its own
    with hot.reading("c1"):
        assert hot.adopt("c2", _image(tmp_path, "2"))
        assert hot.get("c1") is not None  # being read: over `keep` for now
    assert hot.adopt("c3", _image(tmp_path, "3"))
    assert [hot.get(c) is not None for c in ("c1", "c2", "c3")] == [False, False, True]
    assert sorted(p.name for p in (tmp_path / "hot").iterdir()) == ["c3"]
    # a restart drops what the last run kept
    assert HotImages(tmp_path / "hot", keep=1).get("c3") is None
    assert not (tmp_path / "hot" / "c3").exists()
    off = HotImages(tmp_path / "off", keep=0)
    assert not off.adopt("c1", _image(tmp_path, "4")) and off.get("c1") is None


@pytest.mark.criu
async def test_images_are_assembled_and_kept_under_the_configured_image_dir(h: Harness) -> None:
    """SNAPSCALE_IMAGE_DIR (e.g. a tmpfs): a restore assembles its image there and keeps it hot there,
    so CRIU reads from memory rather than from a freshly written disk file."""
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    cid = frozen.entry.checkpoint_id
    shm = Path("/dev/shm") / f"snapscale-test-{uuid.uuid4().hex[:8]}"
    try:
        async with running(h.settings, h.criu, cpu_slots=8, image_dir=shm):
            await h.restore(spec.name, "t")
            t = await h.wait("t")
            assert t.state is ReplicaState.READY and t.tier is Tier.STORE, t.reason
            assert (shm / "hot" / cid / "snapscale-engine.json").exists()
            assert not (_work(h) / "hot" / cid).exists()
            assert await get(t.endpoint, "/generate") == frozen.answer
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_image_dir_from_the_environment() -> None:
    c = RestorerConfig.from_env("h", {"SNAPSCALE_IMAGE_DIR": "/dev/shm/ss"})
    s = Settings(state_dir=Path("/var/lib/x"))
    assert c.images_root(s) == Path("/dev/shm/ss/images")
    assert c.hot_root(s) == Path("/dev/shm/ss/hot")
    d = RestorerConfig.from_env("h", {})
    assert d.images_root(s) == Path("/var/lib/x/restorer/images")
    assert d.hot_root(s) == Path("/var/lib/x/restorer/hot")
