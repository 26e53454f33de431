"""A checkpoint whose weights are outside its image, through the restorer service: the CPU sample
with `--weights-outside` is frozen and uploaded (its weights as chunks beside the image's), then
restored from moto's S3 (the restore starting while the weights are fetched) and again from the
warm host cache, its weights filled from the cache's
chunk files (its weights file is gone by then), answering what it answered before the freeze; then
suspended (the weights released, their record kept) and resumed (filled from the cache again)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from engine_helpers import kill_tagged, read_text, sample_spec
from restorer_harness import Harness, follow, get, running
from safetensors.torch import save_file

from examples.sample_server.model import PRESETS, random_state_dict
from snapscale.shared import bus
from snapscale.shared.bus.messages import ReleaseMode, ReplicaState, Tier
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary
from snapscale.workload.record import IMAGE_FILE

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> AsyncIterator[Harness]:
    tag = f"rweights-{uuid.uuid4().hex[:10]}"
    harness = Harness(s3_settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def test_weights_come_from_the_store_then_the_host_cache(h: Harness, tmp_path: Path) -> None:
    weights = tmp_path / "tiny.safetensors"
    save_file(random_state_dict(PRESETS["tiny"], 0, torch.float32), str(weights))
    base = sample_spec("wsample", tag=h.tag, weights=weights)
    spec = await h.deploy(replace(base, command=[*base.command, "--weights-outside"]))
    frozen = await h.make_checkpoint(spec)
    m = frozen.manifest
    assert m.weights and m.weight_bytes > 600_000
    weights.unlink()  # from now on the weights exist only as chunks
    async with running(h.settings, h.criu, cpu_slots=2) as (svc, _task):
        await h.restore(spec.name, "a")
        ev = await h.wait("a")
        assert ev.state is ReplicaState.READY, ev.reason
        assert ev.tier is Tier.STORE
        assert ev.bytes["fetched"] >= m.weight_bytes
        assert "weights_wait" in ev.timings_s  # the restore ran while the weights were fetched
        assert await get(ev.endpoint, "/generate") == frozen.answer
        assert svc.host is not None
        cache = svc.host.tools.checkpoints.cache
        assert m.weight_digests() <= set(cache.digests())
        assert not any(cache.is_pinned(d) for d in m.weight_digests())  # pinned for the restore only

        await h.restore(spec.name, "b")
        ev2 = await h.wait("b")
        assert ev2.state is ReplicaState.READY, ev2.reason
        assert ev2.tier is Tier.CACHE and ev2.bytes["fetched"] == 0 and "weights_wait" not in ev2.timings_s
        assert await get(ev2.endpoint, "/generate") == frozen.answer

        # Suspended: before_freeze released the weights, the record waits in the run dir; the
        # resume fills them from the cache's chunk files (the weights file is gone: nothing else
        # could), so it answers as before.
        await h.release(spec.name, "b", ReleaseMode.SUSPEND)
        await h.wait("b", frozenset({ReplicaState.SUSPENDED}))
        sb = svc.host.replicas.live["b"].sandbox
        assert (Path(sb.run_dir) / IMAGE_FILE).is_file()
        n = len(h.events)
        await h.restore(spec.name, "c")
        ev3 = await h.wait("c", after=n)
        assert ev3.state is ReplicaState.READY, ev3.reason
        assert ev3.tier is Tier.RESUME and "after_restore" in ev3.timings_s
        assert await get(ev3.endpoint, "/generate") == frozen.answer
        assert f"weights filled from ChunkDir(dir='{cache.chunks_dir}')" in read_text(sb.log_path)
        assert not (Path(sb.run_dir) / IMAGE_FILE).exists()
        assert not any(cache.is_pinned(d) for d in m.weight_digests())
