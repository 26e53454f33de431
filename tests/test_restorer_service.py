"""The restorer service over NATS on real nats-server, moto's S3 and CRIU, with the CPU sample
sandbox: every tier, every fallback, release, idempotency and bad input."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
from conftest import start_nats
from engine_helpers import kill_tagged, procs_with
from nats.js.api import ConsumerInfo
from restorer_harness import Harness, answer_of, follow, get, running

from snapscale.demo.procs import wait_port
from snapscale.shared import bus
from snapscale.shared.bus.messages import HostHeartbeat, ReleaseMode, ReplicaState, Tier, decode_message
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"rtest-{uuid.uuid4().hex[:10]}"
    harness = Harness(settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def test_cold_boot_when_no_checkpoint_then_stop_frees_the_slot(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    async with running(h.settings, h.criu, cpu_slots=1) as (svc, _task):
        await h.restore(spec.name, "r1")
        ev = await h.wait("r1")
        assert ev.state is ReplicaState.READY, ev.reason
        assert ev.tier is Tier.COLD
        assert ev.reason.startswith("no suspended replica; no checkpoint for key ")
        assert {"launch", "ready_probe", "total"} <= ev.timings_s.keys()
        assert [e.state for e in h.of("r1")] == [ReplicaState.STARTING, ReplicaState.READY]
        assert answer_of(await get(ev.endpoint, "/generate"))

        # one CPU slot: a second replica is refused with the reason, the first keeps serving
        await h.restore(spec.name, "r2")
        ev2 = await h.wait("r2")
        assert ev2.state is ReplicaState.FAILED and "no free CPU slot" in ev2.reason

        # stop frees the slot: the process is gone and the next replica comes up
        n = len(h.events)
        await h.release(spec.name, "r1", ReleaseMode.STOP)
        gone = await h.wait("r1", frozenset({ReplicaState.STOPPED}), after=n)
        assert gone.reason == "released"
        assert procs_with(h.tag) == []
        run = h.settings.state_dir / "restorer" / "run"
        assert not [d.name for d in run.iterdir() if d.name.startswith("r1.")]  # its logs went with it
        await h.restore(spec.name, "r3")
        assert (await h.wait("r3")).state is ReplicaState.READY

        # the inventory says so within a heartbeat or two
        hb = await _heartbeat(h, lambda hb: [r.replica for r in hb.replicas] == ["r3"])
        assert hb.cpu_slots == 0 and hb.gpus == [] and hb.compat["gpu_model"] == "cpu"
        assert svc.host is not None and svc.host.tools.slots.free_cpu_slots() == 0
        # and on core NATS, for the scaler's live view
        sub = await h.bus.nc.subscribe(h.bus.subjects.evt_host(h.host))
        try:
            msg = await sub.next_msg(timeout=5)
        finally:
            await sub.unsubscribe()
        assert decode_message(msg.data, HostHeartbeat).host == h.host


async def test_restore_from_s3_then_from_warm_cache(h: Harness, s3_settings: Settings) -> None:
    h.settings = s3_settings
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    async with running(s3_settings, h.criu, cpu_slots=2):
        await h.restore(spec.name, "a")
        ev = await h.wait("a")
        assert ev.state is ReplicaState.READY, ev.reason
        assert ev.tier is Tier.STORE
        assert ev.checkpoint_id == frozen.entry.checkpoint_id
        assert ev.reason.startswith("no suspended replica; not in host cache (0.0 MB of ")
        assert ev.bytes["fetched"] > 0 and ev.bytes["cached"] == 0
        assert {
            "lookup",
            "prefetch",
            "materialize",
            "criu_restore",
            "after_restore",
            "ready_probe",
        } <= ev.timings_s.keys()
        assert await get(ev.endpoint, "/generate") == frozen.answer
        assert await get(ev.endpoint, "/timings") == frozen.timings  # the frozen process, not a new boot

        await h.restore(spec.name, "b")
        ev2 = await h.wait("b")
        assert ev2.state is ReplicaState.READY, ev2.reason
        assert ev2.tier is Tier.CACHE
        assert ev2.bytes["fetched"] == 0 and ev2.bytes["cached"] > 0
        assert ev2.endpoint != ev.endpoint
        assert await get(ev2.endpoint, "/generate") == frozen.answer


async def test_resume_from_suspend(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    async with running(h.settings, h.criu, cpu_slots=1) as (svc, _):
        await h.restore(spec.name, "r1")
        ev = await h.wait("r1")
        assert ev.state is ReplicaState.READY and ev.tier is Tier.COLD
        before = await get(ev.endpoint, "/timings")
        await h.release(spec.name, "r1", ReleaseMode.SUSPEND)
        await h.wait("r1", frozenset({ReplicaState.SUSPENDED}))
        assert svc.host is not None and svc.host.tools.slots.free_cpu_slots() == 1  # its slot is free
        n = len(h.events)
        await h.restore(spec.name, "r1")
        ev2 = await h.wait("r1", after=n)
        assert ev2.state is ReplicaState.READY, ev2.reason
        assert ev2.tier is Tier.RESUME and ev2.reason == ""
        assert [e.state for e in h.of("r1")][-2:] == [ReplicaState.RESUMING, ReplicaState.READY]
        assert await get(ev2.endpoint, "/timings") == before


async def test_duplicate_restore_yields_one_replica(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    async with running(h.settings, h.criu) as (svc, _):
        cmd = await h.restore(spec.name, "r1")
        await h.send(bus_verb_restore(), cmd)  # the same command again, under another message id
        await h.send(bus_verb_restore(), replace(cmd, id="other-id"))  # and another command for it
        ev = await h.wait("r1")
        assert ev.state is ReplicaState.READY
        await _settle(h)
        assert [e.state for e in h.of("r1")] == [ReplicaState.STARTING, ReplicaState.READY]
        assert svc.host is not None and list(svc.host.replicas.live) == ["r1"]


async def test_malformed_command_is_refused_and_service_keeps_serving(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    async with running(h.settings, h.criu):
        subject = h.bus.subjects.cmd(bus_verb_restore(), h.host)
        await h.bus.js.publish(subject, b"{not json")
        await h.bus.js.publish(subject, b'{"v": 1, "type": "scale-up", "id": "x", "deployment": "d"}')
        await h.restore("no-such-deployment", "ghost")
        ghost = await h.wait("ghost")
        assert ghost.state is ReplicaState.FAILED and "not deployed" in ghost.reason
        await h.restore(spec.name, "r1")
        assert (await h.wait("r1")).state is ReplicaState.READY
        info = await _settle(h)
        assert info.num_redelivered == 0  # the bad ones were terminated, not retried


def bus_verb_restore() -> Verb:
    return Verb.SCALE_UP


async def _heartbeat(
    h: Harness, ok: Callable[[HostHeartbeat], bool], timeout_s: float = 5.0
) -> HostHeartbeat:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await bus.kv_get(h.bus.kv[Bucket.HOSTS], h.host)
        hb = decode_message(got[0], HostHeartbeat) if got else None
        if hb is not None and ok(hb):
            return hb
        assert time.monotonic() < deadline, f"no matching heartbeat in {timeout_s}s; last {hb}"
        await asyncio.sleep(0.1)


async def _settle(h: Harness) -> ConsumerInfo:
    """The restore consumer once every command is acked (or fail)."""
    for _ in range(100):
        info = await h.bus.js.consumer_info(h.bus.subjects.cmd_stream, f"restorer-scale-up-{h.host}")
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return cast(ConsumerInfo, info)
        await asyncio.sleep(0.05)
    raise AssertionError(f"commands still pending: {info}")


async def test_two_restores_race_for_one_suspended_replica(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    async with running(h.settings, h.criu, cpu_slots=2) as (svc, _):
        await h.restore(spec.name, "r1")
        assert (await h.wait("r1")).state is ReplicaState.READY
        await h.release(spec.name, "r1", ReleaseMode.SUSPEND)
        await h.wait("r1", frozenset({ReplicaState.SUSPENDED}))
        await asyncio.gather(h.restore(spec.name, "x"), h.restore(spec.name, "y"))
        x, y = await h.wait("x"), await h.wait("y")
        assert x.state is ReplicaState.READY and y.state is ReplicaState.READY, (x.reason, y.reason)
        assert {x.tier, y.tier} == {Tier.RESUME, Tier.COLD}
        resumed = x if x.tier is Tier.RESUME else y
        gone = await h.wait("r1", frozenset({ReplicaState.STOPPED}))
        assert gone.reason == f"resumed as replica {resumed.replica}"
        assert svc.host is not None and sorted(svc.host.replicas.live) == ["x", "y"]
        assert svc.host.tools.registry.get("r1") is None
        reg = svc.host.tools.registry.get(resumed.replica)
        assert reg is not None and reg.endpoint == resumed.endpoint


async def test_keeps_serving_across_a_nats_server_restart(h: Harness, tmp_path: Path) -> None:
    # a private nats-server, restarted on the same port and store while the restorer runs
    (tmp_path / "own-nats").mkdir()
    srv = start_nats(tmp_path / "own-nats")
    settings = replace(h.settings, nats_url=srv.url)
    argv = [str(srv.proc.args[0]), "-a", "127.0.0.1", "-p", str(srv.port), "-js", "-sd", str(srv.store_dir)]  # type: ignore[index]
    procs = [srv.proc]
    own = await bus.open_bus(settings, "test-own")
    try:
        other = Harness(settings, own, h.criu, h.tag, h.tmp)
        async for _ in follow(other):
            spec = await other.deploy(other.spec())
            async with running(settings, h.criu):
                await other.restore(spec.name, "r1")
                assert (await other.wait("r1")).state is ReplicaState.READY
                srv.proc.terminate()
                srv.proc.wait(10)
                await asyncio.sleep(1.5)
                procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # noqa: ASYNC220
                await asyncio.to_thread(wait_port, srv.port)
                await other.restore(spec.name, "r2")
                assert (await other.wait("r2", timeout_s=30)).state is ReplicaState.READY
    finally:
        await own.close()
        for p in procs:
            p.terminate()
            p.wait(10)
