"""A release that frees a slot is announced by a heartbeat at once, not at the next interval: the
scaler places new replicas on the free slots heartbeats report (on a GPU host a scale-up after a
scale to zero waited up to a whole interval for it). Real nats-server, CRIU and the CPU sample."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NoReturn

import pytest
from engine_helpers import kill_tagged
from nats.aio.msg import Msg
from restorer_harness import Harness, follow, running

from snapscale.restorer import service
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.service import Restorer
from snapscale.shared import bus
from snapscale.shared.bus import Bucket
from snapscale.shared.bus.messages import HostHeartbeat, ReleaseMode, ReplicaState, decode_message
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import CriuBinary

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"rbeat-{uuid.uuid4().hex[:10]}"
    harness = Harness(settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def test_release_is_followed_by_a_heartbeat_at_once(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    beats: list[tuple[float, HostHeartbeat]] = []
    sent_at = float("inf")  # the start-up beat also shows the slot free: only later ones count
    freed = asyncio.Event()

    async def on(m: Msg) -> None:
        hb = decode_message(m.data, HostHeartbeat)
        beats.append((time.monotonic(), hb))
        if beats[-1][0] > sent_at and hb.cpu_slots == 1:
            freed.set()

    sub = await h.bus.nc.subscribe(h.bus.subjects.evt_host(h.host), cb=on)
    # a long interval: any beat within a few seconds of the release is one the release asked for
    svc = Restorer(h.settings, RestorerConfig(host=h.host, cpu_slots=1, heartbeat_s=60.0), criu=h.criu)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        await asyncio.wait_for(svc.ready.wait(), 30)
        await h.restore(spec.name, "r1")
        assert (await h.wait("r1")).state is ReplicaState.READY
        n = len(h.events)
        sent_at = time.monotonic()
        await h.release(spec.name, "r1", ReleaseMode.STOP)
        await h.wait("r1", frozenset({ReplicaState.STOPPED}), after=n)
        released_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(freed.wait(), 5.0)
        free = [at for at, b in beats if at > sent_at and b.cpu_slots == 1]
        assert free, f"no heartbeat with the slot free within 5 s of the release (interval 60 s): {beats}"
        assert free[0] - released_at < 2.0
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sub.unsubscribe()
        if svc.host is not None:
            for lv in list(svc.host.replicas.live.values()):
                await engine.stop(lv.sandbox)


async def test_beats_go_on_while_jetstream_hangs(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a NATS cluster elects a stream leader, JetStream requests hang for seconds; the beat is
    core NATS, and a host that misses 3 s of them is counted lost by the scaler."""
    beats: list[float] = []

    async def on(m: Msg) -> None:
        beats.append(time.monotonic())

    sub = await h.bus.nc.subscribe(h.bus.subjects.evt_host(h.host), cb=on)
    try:
        async with running(h.settings, h.criu) as (svc, _task):  # beats every 0.5 s
            assert svc.host is not None
            kv = svc.host.tools.bus.kv[Bucket.HOSTS]

            async def hangs(*_a: object, **_k: object) -> NoReturn:
                await asyncio.sleep(3600)
                raise AssertionError("unreachable")

            monkeypatch.setattr(service, "deployment_keys", hangs)
            monkeypatch.setattr(kv, "put", hangs)
            t0 = time.monotonic()
            await asyncio.sleep(3.0)
            during = [t for t in beats if t > t0 + 0.6]  # a beat already under way may finish late
            assert len(during) >= 3, f"{len(during)} beats in 2.4 s with JetStream hanging"
    finally:
        await sub.unsubscribe()
