"""The scaler with the real restorer and freezer (CRIU, the CPU sample sandbox), all as processes
on a real nats-server: traffic from zero brings a replica up by a cold boot; the leader scaler is
killed while it starts and the standby takes over without a second replica; no traffic releases
it (after the auto-freeze); traffic again brings it back by restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from test_scaler_service import quick

from snapscale.demo.procs import ProcessSet, log_tail, reap_sandboxes
from snapscale.scaler.lease import LEASE_KEY, LEASE_TYPE, LeaseRecord
from snapscale.shared import bus
from snapscale.shared.bus import spec
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.messages import (
    CheckpointEvent,
    ReplicaEvent,
    ReplicaState,
    ScaleUpCommand,
    Tier,
    TrafficEvent,
    decode_message,
)
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core import wire
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample_cpu_quick.toml"


def tuned(d: spec.DeploymentSpec) -> spec.DeploymentSpec:
    """One replica, short windows, auto-freeze after the cold boot (as the demo tunes it)."""
    scaling = quick(d.scaling, max_replicas=1, scale_to_zero_after_s=3.0)
    return replace(d, scaling=scaling, freeze=replace(d.freeze, after_ready=True, keep_running=True))


async def until(cond: Callable[[], bool], timeout_s: float, what: str, procs: ProcessSet) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        dead = procs.dead()
        if time.monotonic() > deadline or any(m.name in ("restorer", "freezer") for m in dead):
            logs = "\n".join(f"--- {m.name}\n{log_tail(m.log_path, 25)}" for m in procs.procs)
            raise AssertionError(f"not within {timeout_s}s: {what}\n{logs}")
        await asyncio.sleep(0.05)


async def leader(b: Bus) -> str | None:
    got = await bus.kv_get(b.kv[Bucket.LEASES], LEASE_KEY)
    return wire.decode(got[0], LeaseRecord, LEASE_TYPE).holder if got else None


@pytest.mark.criu
@pytest.mark.slow
async def test_scale_from_zero_handover_to_zero_and_back_by_restore(
    criu: CriuBinary, the_bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "SNAPSCALE_NATS_URL": settings.nats_url,
        "SNAPSCALE_NAMESPACE": settings.namespace,
        "SNAPSCALE_SIGNING_KEY": settings.signing_key.decode(),
        "SNAPSCALE_STATE_DIR": str(tmp_path / "state"),
        "SNAPSCALE_CACHE_DIR": str(tmp_path / "cache"),
        "SNAPSCALE_STORE": f"file://{tmp_path / 'store'}",
        "SNAPSCALE_CRIU": criu.path,
    }
    me = [sys.executable, "-m", "snapscale"]
    procs = ProcessSet(tmp_path / "logs")
    commands: list[ScaleUpCommand] = []
    events: list[ReplicaEvent] = []
    frozen: list[CheckpointEvent] = []

    async def on_cmd(m: Msg) -> None:
        commands.append(decode_message(m.data, ScaleUpCommand))

    async def on_evt(m: Msg) -> None:
        events.append(decode_message(m.data, ReplicaEvent))

    async def on_ckpt(m: Msg) -> None:
        frozen.append(decode_message(m.data, CheckpointEvent))

    subs = [
        await the_bus.nc.subscribe(the_bus.subjects.cmd(Verb.SCALE_UP, "h1"), cb=on_cmd),
        await the_bus.nc.subscribe(the_bus.subjects.evt_replica_all(), cb=on_evt),
        await the_bus.nc.subscribe(the_bus.subjects.evt_checkpoint_all(), cb=on_ckpt),
    ]
    traffic_on = asyncio.Event()

    async def gateway() -> None:
        while True:
            await traffic_on.wait()
            ev = TrafficEvent("sample-cpu", time.time(), arrivals=1, concurrency=1.0)
            await bus.publish_core(the_bus, the_bus.subjects.traffic("sample-cpu"), ev)
            await asyncio.sleep(0.25)

    def ready(tier: Tier | None = None) -> list[ReplicaEvent]:
        return [e for e in events if e.state is ReplicaState.READY and (tier is None or e.tier is tier)]

    gw = asyncio.create_task(gateway())
    try:
        for name, argv, host in (
            ("restorer", [*me, "restorer", "--host", "h1"], "h1"),
            ("freezer", [*me, "freezer", "--host", "h1"], "h1"),
            ("scaler-a", [*me, "scaler", "--tick-s", "0.2", "--lease-s", "1"], "scaler-a"),
        ):
            procs.start(name, argv, dict(env, SNAPSCALE_HOST_ID=host), cwd=ROOT)
        deadline = time.monotonic() + 60
        while not (await leader(the_bus) or "").startswith("scaler-a"):
            assert time.monotonic() < deadline, log_tail(procs.procs[2].log_path)
            await asyncio.sleep(0.1)
        procs.start("scaler-b", [*me, "scaler", "--tick-s", "0.2", "--lease-s", "1"],
                    dict(env, SNAPSCALE_HOST_ID="scaler-b"), cwd=ROOT)  # fmt: skip
        while await bus.kv_get(the_bus.kv[Bucket.HOSTS], "h1") is None:
            assert time.monotonic() < deadline, "no heartbeat from the restorer"
            await asyncio.sleep(0.2)
        d = tuned(spec.load_spec(SAMPLE))
        await the_bus.kv[Bucket.DEPLOYMENTS].put(d.name, d.to_json())
        await asyncio.sleep(1.0)  # both scalers have the spec from their KV watch

        # from zero: the first restore command, then the leader dies while the replica boots
        traffic_on.set()
        await until(lambda: bool(commands), 20, "a restore command", procs)
        a = procs.procs[2]
        os.killpg(a.proc.pid, signal.SIGKILL)  # no clean stop: the lease is left to lapse
        a.proc.wait(10)
        t_kill = time.monotonic()
        while not (await leader(the_bus) or "").startswith("scaler-b"):
            assert time.monotonic() - t_kill < 10, log_tail(procs.procs[3].log_path)
            await asyncio.sleep(0.1)
        await until(lambda: bool(ready()), 180, "the first replica ready", procs)
        assert ready()[0].tier is Tier.COLD
        await asyncio.sleep(2.0)  # the new leader has had ticks to (wrongly) add a second one
        assert {c.replica for c in commands} == {ready()[0].replica}, "one replica, whoever leads"
        assert len(ready()) == 1

        # no traffic: the auto-freeze's checkpoint, then the release after the grace
        traffic_on.clear()
        await until(lambda: any(f.ok for f in frozen), 180, "the auto-freeze", procs)
        first = ready()[0].replica
        await until(
            lambda: any(e.replica == first and e.state is ReplicaState.STOPPED for e in events),
            60, "the release to zero", procs,
        )  # fmt: skip

        # traffic again: back by restore from the checkpoint
        traffic_on.set()
        await until(lambda: len(ready()) == 2, 180, "the replica back", procs)
        assert ready()[1].tier in (Tier.STORE, Tier.CACHE), ready()[1].reason
        assert len({c.replica for c in commands}) == 2
    finally:
        gw.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gw
        for s in subs:
            await s.unsubscribe()
        procs.stop_all()
        reap_sandboxes(tmp_path)
