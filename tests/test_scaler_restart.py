"""A restorer that restarts under the scaler: its first heartbeat says what it still holds, and
the replicas the scaler had on it that it does not list are replaced at once, on that host too
(a restart is not the deployment's fault: the host is not avoided for it).

The pure half on `View`; the service half on a real nats-server with the test playing the host
(tests/test_scaler_service.py's FakeHost, plus a start time and a restart).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from nats.aio.msg import Msg
from test_scaler_service import CFG, SPEC, FakeHost, deploy, eventually, running

from snapscale.scaler.records import Tracked
from snapscale.scaler.service import Scaler
from snapscale.scaler.view import View
from snapscale.shared import bus
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.subjects import Bucket
from snapscale.shared.core.settings import Settings

S = bus.ReplicaState


def beat(host: str, started_at: float, *listed: str) -> bus.HostHeartbeat:
    reps = [bus.ReplicaSummary("llm", r, S.READY) for r in listed]
    return bus.HostHeartbeat(
        host=host, ts=started_at + 1, compat_hash="k", replicas=reps, started_at=started_at
    )


def tracked(replica: str, state: bus.ReplicaState, ts: float, host: str = "h1") -> Tracked:
    return Tracked(bus.ReplicaEvent("llm", replica, host, state, ts), None, ts)


def test_a_restart_loses_what_the_old_process_held_and_it_does_not_list() -> None:
    v = View()
    assert v.heartbeat(beat("h1", 100.0), now=100.0) == []
    for t in (
        tracked("ready", S.READY, 150.0),
        tracked("restoring", S.RESTORING, 160.0),
        tracked("starting", S.STARTING, 160.0),
        tracked("suspended", S.SUSPENDED, 120.0),
        tracked("kept", S.READY, 150.0),  # re-adopted: listed
        tracked("pending", S.PENDING, 170.0),  # its command is on the stream: the new process takes it
        tracked("resuming", S.RESUMING, 170.0),  # placed by the scaler: a command too
        tracked("new", S.RESTORING, 210.0),  # already the new process's
        tracked("elsewhere", S.READY, 150.0, host="h2"),
    ):
        v.track(t)
    v.avoid[("llm", "h1")] = 1e12
    v.avoid[("llm", "h2")] = 1e12
    assert v.heartbeat(beat("h1", 100.0, "kept"), now=190.0) == []  # no restart: nothing lost
    assert v.avoided("llm", 190.0) == {"h1", "h2"}

    lost = v.heartbeat(beat("h1", 200.0, "kept"), now=201.0)
    assert sorted(t.ev.replica for t in lost) == ["ready", "restoring", "starting", "suspended"]
    assert v.avoided("llm", 201.0) == {"h2"}  # the restart's failures are not the deployment's
    assert v.heartbeat(beat("h1", 200.0), now=202.0) == []  # said once


def test_a_failure_the_restarted_process_reports_is_the_restarts() -> None:
    v = View()
    v.heartbeat(beat("h1", 100.0), now=100.0)
    old = tracked("r1", S.RESTORING, 150.0)
    failed = replace(old.ev, state=S.FAILED, ts=205.0)
    assert not v.cut_by_restart(old, failed)  # the restart is not known yet: an ordinary failure
    v.heartbeat(beat("h1", 200.0), now=201.0)
    assert v.cut_by_restart(old, failed)
    assert not v.cut_by_restart(tracked("r2", S.RESTORING, 202.0), failed)  # the new process's own


@dataclass
class RestartingHost(FakeHost):
    """A FakeHost with a start time in its heartbeat; `hang` keeps new replicas restoring."""

    started_at: float = field(default_factory=time.time)
    hang: bool = False

    def heartbeat(self) -> bus.HostHeartbeat:
        return replace(super().heartbeat(), started_at=self.started_at)

    async def on_scale_up(self, c: bus.ScaleUpCommand, m: Msg) -> None:
        if not self.hang:
            await super().on_scale_up(c, m)
            return
        self.got.append(c)
        await self.record(
            bus.ReplicaEvent(
                c.deployment, c.replica, self.name, S.RESTORING, time.time(), c.id, bus.Tier.CACHE
            )
        )

    def restart(self) -> None:
        """A new process: it holds nothing it does not list."""
        self.live.clear()
        self.started_at = time.time()


async def traffic(b: Bus) -> None:
    await bus.publish_core(b, b.subjects.traffic("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0))


async def test_a_ready_replica_lost_in_a_restart_is_replaced_on_the_first_heartbeat(
    the_bus: Bus, settings: Settings
) -> None:
    """A restorer that came back with nothing (its state dir gone): no failed event ever comes."""
    await deploy(the_bus, replace(SPEC, scaling=replace(SPEC.scaling, min_replicas=1)))
    host = RestartingHost(settings, "host-a", gpus=1)
    sc = Scaler(settings, replace(CFG, tick_s=30.0))  # no tick helps: the heartbeat must
    async with running(host.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        await traffic(the_bus)
        await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [S.READY], 10, "first ready")
        (first,) = [t.ev.replica for t in sc.view.of("llm")]
        host.restart()
        t0 = time.monotonic()
        await eventually(lambda: len(host.commands(bus.ScaleUpCommand)) == 2, 5, "replaced")
        assert time.monotonic() - t0 < 2.0
        await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [S.READY], 5, "second ready")
        assert [t.ev.replica for t in sc.view.of("llm")] != [first]
        assert sc.counters["failed"] == 1 and not sc.view.avoid


async def test_a_restore_cut_short_by_a_restart_is_placed_again_on_the_same_host(
    the_bus: Bus, settings: Settings
) -> None:
    """The restarted restorer reports the cut-short restore failed before its first heartbeat (as
    restart.adopt does): the only host must not be avoided for the deployment (that was ~60 s)."""
    await deploy(the_bus, replace(SPEC, scaling=replace(SPEC.scaling, min_replicas=1)))
    host = RestartingHost(settings, "host-a", gpus=1, hang=True)
    sc = Scaler(settings, CFG)
    async with running(host.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        await traffic(the_bus)
        await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [S.RESTORING], 10, "restoring")
        (cut,) = host.commands(bus.ScaleUpCommand)
        assert isinstance(cut, bus.ScaleUpCommand)
        host.beating = False
        host.restart()
        host.hang = False
        await host.record(
            bus.ReplicaEvent(
                "llm", cut.replica, "host-a", S.FAILED, time.time(), cut.id,
                reason="the restorer restarted mid-restore; what it had started was cleaned up",
            )
        )  # fmt: skip
        await eventually(lambda: not list(sc.view.of("llm")), 5, "the failed event seen")
        host.beating = True
        t0 = time.monotonic()
        await eventually(lambda: len(host.commands(bus.ScaleUpCommand)) == 2, 5, "placed again on host-a")
        assert time.monotonic() - t0 < 3.0
        await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [S.READY], 5, "ready")
        assert not sc.view.avoid


async def test_a_new_leader_fails_what_kv_holds_of_a_restorer_that_restarted_meanwhile(
    the_bus: Bus, settings: Settings
) -> None:
    """The restorer restarted with nothing while no scaler ran: KV still says ready, and the
    heartbeat's start time is not news to a scaler that first hears of the host now."""
    await deploy(the_bus, replace(SPEC, scaling=replace(SPEC.scaling, min_replicas=1)))
    host = RestartingHost(settings, "host-a", gpus=1)
    async with running(host.run):
        await eventually(lambda: host._bus is not None)
        await host.record(
            bus.ReplicaEvent("llm", "llm-old", "host-a", S.READY, time.time() - 60, gpu_uuids=["host-a-g0"])
        )
        # as a restorer does: its inventory in KV too, which a starting scaler reads before anything
        await the_bus.kv[Bucket.HOSTS].put("host-a", bus.encode_message(host.heartbeat()))
        sc = Scaler(settings, CFG)
        async with running(sc.run):
            await eventually(lambda: sc.leader, 5, "leading")
            await eventually(lambda: len(host.commands(bus.ScaleUpCommand)) == 1, 5, "replaced")
            assert "llm-old" not in {t.ev.replica for t in sc.view.of("llm")}
            got = await bus.kv_get(the_bus.kv[Bucket.REPLICAS], "llm.llm-old")
            assert got is None  # failed: its record is gone
