"""The scaler service on a real nats-server, with the test playing restorer hosts over NATS:
heartbeats out, restore/release/freeze/prefetch commands in, replica and checkpoint events out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from nats.aio.msg import Msg
from spanfix import memory_spans

from snapscale.restorer import events
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.service import Scaler
from snapscale.shared import bus
from snapscale.shared.bus import catalog
from snapscale.shared.bus.catalog import CatalogEntry
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.spec import DeploymentSpec, ScalingSpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core import telemetry
from snapscale.shared.core.settings import Settings


def quick(scaling: ScalingSpec, **also: Any) -> ScalingSpec:
    """One replica per request in flight, 2 s and 1 s windows, replicas stopped on release: the
    knobs the service tests turn so that scaling up or down takes seconds (plus `also`)."""
    return replace(
        scaling,
        target_concurrency=1.0,
        utilization=1.0,
        stable_window_s=2.0,
        panic_window_s=1.0,
        release_mode="stop",
        **also,
    )


FAST = quick(ScalingSpec(), scale_to_zero_after_s=1.0, max_replicas=4, ready_timeout_s=30.0)
SPEC = DeploymentSpec(name="llm", command=["serve"], gpus=1, scaling=FAST)
CFG = ScalerConfig(tick_s=0.1, lease_s=1.0, freeze_timeout_s=10.0)


@dataclass
class FakeHost:
    """A restorer as the scaler sees it on the wire. `ready_after_s=None` never gets ready."""

    settings: Settings
    name: str
    gpus: int = 2
    ready_after_s: float | None = 0.05
    compat_hash: str = "k1"
    beating: bool = True
    suspend_budget: int = 0
    live: dict[str, bus.ReplicaSummary] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    got: list[object] = field(default_factory=list)
    tiers: list[bus.Tier] = field(default_factory=list)
    _bus: Bus | None = None

    @property
    def b(self) -> Bus:
        assert self._bus is not None
        return self._bus

    def heartbeat(self) -> bus.HostHeartbeat:
        busy = {
            u for r in self.live.values() if r.state is not bus.ReplicaState.SUSPENDED for u in r.gpu_uuids
        }
        gpus = [
            bus.GpuInfo(i, f"{self.name}-g{i}", "H100", 80 << 30, free=f"{self.name}-g{i}" not in busy)
            for i in range(self.gpus)
        ]
        return bus.HostHeartbeat(
            host=self.name,
            ts=time.time(),
            compat_hash=self.compat_hash,
            gpus=gpus,
            cached_checkpoints=list(self.cached),
            cached_bytes={c: 1 << 20 for c in self.cached},
            replicas=list(self.live.values()),
            interval_s=0.2,
            suspend_budget_bytes=self.suspend_budget,
        )

    async def record(self, ev: bus.ReplicaEvent) -> None:
        """The restorer's own recording: KV record first (compare-and-set), then the event."""
        await events.record(self.b, ev)

    async def on_scale_up(self, c: bus.ScaleUpCommand, _m: Msg) -> None:
        self.got.append(c)
        tier = bus.Tier.CACHE if self.cached else bus.Tier.COLD
        self.live[c.replica] = bus.ReplicaSummary(
            c.deployment, c.replica, bus.ReplicaState.RESTORING, c.gpu_uuids
        )
        if self.ready_after_s is None:
            return
        await self.record(
            bus.ReplicaEvent(
                c.deployment, c.replica, self.name, bus.ReplicaState.RESTORING, time.time(), c.id, tier
            )
        )
        await asyncio.sleep(self.ready_after_s)
        self.live[c.replica] = replace(self.live[c.replica], state=bus.ReplicaState.READY)
        self.tiers.append(tier)
        await self.record(
            bus.ReplicaEvent(
                c.deployment, c.replica, self.name, bus.ReplicaState.READY, time.time(), c.id, tier,
                gpu_uuids=c.gpu_uuids,
            )
        )  # fmt: skip

    async def on_release(self, c: bus.ReleaseCommand, _m: Msg) -> None:
        self.got.append(c)
        self.live.pop(c.replica, None)
        state = bus.ReplicaState.SUSPENDED if c.mode is bus.ReleaseMode.SUSPEND else bus.ReplicaState.STOPPED
        await self.record(bus.ReplicaEvent(c.deployment, c.replica, self.name, state, time.time(), c.id))

    async def on_freeze(self, c: bus.FreezeCommand, _m: Msg) -> None:
        self.got.append(c)
        ckpt = f"ck-{c.deployment}-1"
        entry = CatalogEntry(
            c.deployment, self.compat_hash, ckpt, f"manifests/{ckpt}.json", time.time(), self.name
        )
        await catalog.publish_entry(self.b.kv[Bucket.CHECKPOINTS], entry)
        self.cached.append(ckpt)
        ev = bus.CheckpointEvent(
            c.deployment, self.name, True, time.time(), c.id, ckpt, c.replica, self.compat_hash
        )
        await bus.publish(self.b, self.b.subjects.evt_checkpoint(c.deployment), ev)

    async def on_prefetch(self, c: bus.PrefetchCommand, _m: Msg) -> None:
        self.got.append(c)

    def commands(self, cls: type) -> list[object]:
        return [c for c in self.got if isinstance(c, cls)]

    async def run(self, stop: asyncio.Event) -> None:
        self._bus = await bus.open_bus(self.settings, f"fake-{self.name}")
        try:
            await self._serve(stop)
        finally:
            await self.b.nc.close()  # a drain would wait on the pull subscriptions' open requests

    async def _serve(self, stop: asyncio.Event) -> None:
        s = self.b.subjects
        handlers: list[tuple[Verb, type, Callable[..., Awaitable[None]]]] = [
            (Verb.SCALE_UP, bus.ScaleUpCommand, self.on_scale_up),
            (Verb.RELEASE, bus.ReleaseCommand, self.on_release),
            (Verb.FREEZE, bus.FreezeCommand, self.on_freeze),
            (Verb.PREFETCH, bus.PrefetchCommand, self.on_prefetch),
        ]
        tasks = [
            asyncio.create_task(
                bus.consume(self.b, s.cmd(v, self.name), s.durable("fake", v, self.name), cls, h, stop=stop)
            )
            for v, cls, h in handlers
        ]
        while not stop.is_set():
            if self.beating:
                await bus.publish_core(self.b, s.evt_host(self.name), self.heartbeat())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def running(
    *parts: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p(stop)) for p in parts]
    try:
        yield stop
    finally:
        stop.set()
        _done, late = await asyncio.wait(tasks, timeout=10)
        for t in late:
            t.cancel()
        assert not late, f"did not stop within 10s: {late}"


async def eventually(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def send_traffic(b: Bus, dep: str, seconds: float, concurrency: float = 1.0) -> None:
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        ev = bus.TrafficEvent(dep, time.time(), arrivals=1, concurrency=concurrency)
        await bus.publish_core(b, b.subjects.traffic(dep), ev)
        await asyncio.sleep(0.1)


async def deploy(b: Bus, spec: DeploymentSpec) -> None:
    await b.kv[Bucket.DEPLOYMENTS].put(spec.name, spec.to_json())


async def test_zero_to_one_to_zero_and_back_by_restore(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, SPEC)
    a, b = FakeHost(settings, "host-a"), FakeHost(settings, "host-b")
    sc = Scaler(settings, CFG)
    async with running(a.run, b.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts and "host-b" in sc.view.hosts)
        # the first event alone brings a replica up, before any tick could
        t0 = time.monotonic()
        await bus.publish_core(
            the_bus, the_bus.subjects.traffic("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0)
        )
        await eventually(lambda: len(a.commands(bus.ScaleUpCommand) + b.commands(bus.ScaleUpCommand)) == 1)
        assert time.monotonic() - t0 < 2.0, "activation waited for something (a tick is 0.1 s here)"
        assert sc.counters["activations"] == 1
        await send_traffic(the_bus, "llm", 1.0)
        await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [bus.ReplicaState.READY])
        first = (a if a.commands(bus.ScaleUpCommand) else b).name
        host = a if first == "host-a" else b
        # no traffic: after the grace, a freeze (no checkpoint yet), then the release, then a prefetch
        await eventually(lambda: bool(host.commands(bus.ReleaseCommand)), 15, "release after the grace")
        assert len(host.commands(bus.FreezeCommand)) == 1
        assert host.got.index(host.commands(bus.FreezeCommand)[0]) < host.got.index(
            host.commands(bus.ReleaseCommand)[0]
        )
        other = b if host is a else a
        await eventually(lambda: bool(other.commands(bus.PrefetchCommand)), 5, "prefetch on the other host")
        assert not host.commands(bus.PrefetchCommand)  # it holds the checkpoint already
        await eventually(lambda: sc.view.live_count("llm") == 0 and not host.live)
        # traffic again: back by restore, on the host whose cache holds the checkpoint
        await send_traffic(the_bus, "llm", 0.3)
        await eventually(lambda: len(host.commands(bus.ScaleUpCommand)) == 2, 5, "restore on the cached host")
        assert not other.commands(bus.ScaleUpCommand)
        await eventually(lambda: host.tiers == [bus.Tier.COLD, bus.Tier.CACHE])
        assert sc.stats()["traffic.ok"] >= 10


async def test_bad_traffic_is_counted_and_dropped(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, SPEC)
    a = FakeHost(settings, "host-a")
    sc = Scaler(settings, CFG)
    async with running(a.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        subj = the_bus.subjects.traffic
        await the_bus.nc.publish(subj("llm"), b"{not json")
        await the_bus.nc.publish(subj("llm"), b'{"v": 1, "type": "traffic", "deployment": "llm", "ts": "x"}')
        # valid JSON, absurd numbers: once they overflowed the window to inf, then NaN, for good
        head = b'{"v":1,"type":"traffic","deployment":"llm","ts":1,"concurrency":'
        for value in (b"1.7e308", b"1e999", b"-1"):
            await the_bus.nc.publish(subj("llm"), head + value + b"}")
        await bus.publish_core(the_bus, subj("nope"), bus.TrafficEvent("nope", time.time(), 1, 1.0))
        await the_bus.nc.flush()
        await eventually(
            lambda: sc.stats().get("traffic.malformed") == 5 and sc.stats().get("traffic.unknown") == 1
        )
        assert not a.commands(bus.ScaleUpCommand)
        # the loop lives on: good traffic still scales
        await bus.publish_core(the_bus, subj("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0))
        await eventually(lambda: len(a.commands(bus.ScaleUpCommand)) == 1)


async def test_not_ready_in_time_and_lost_hosts_are_placed_elsewhere(
    the_bus: Bus, settings: Settings
) -> None:
    await deploy(
        the_bus, replace(SPEC, scaling=replace(FAST, ready_timeout_s=1.0, scale_to_zero_after_s=30.0))
    )
    stuck = FakeHost(settings, "host-a", gpus=4, ready_after_s=None)
    sc = Scaler(settings, CFG)
    async with running(stuck.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        await bus.publish_core(
            the_bus, the_bus.subjects.traffic("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0)
        )
        await eventually(lambda: len(stuck.commands(bus.ScaleUpCommand)) == 1)
        good = FakeHost(settings, "host-b", gpus=1)
        async with running(good.run):
            # the stuck replica times out, is cleaned up on its host and placed on the other one
            await eventually(lambda: len(good.commands(bus.ScaleUpCommand)) == 1, 10, "re-placed on host-b")
            assert [type(c).__name__ for c in stuck.got] == ["ScaleUpCommand", "ReleaseCommand"]
            assert sc.counters["failed"] == 1
            await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [bus.ReplicaState.READY])
            # host-b goes silent: its replica is lost and placed again, on a host that reports
            # (host-a is still avoided for this deployment after its replica timed out there)
            good.beating = False
            await eventually(lambda: "host-b" not in sc.view.hosts, 5, "host-b expired")
            assert sc.counters["failed"] == 2
            fresh = FakeHost(settings, "host-c", gpus=1)
            async with running(fresh.run):
                await eventually(
                    lambda: len(fresh.commands(bus.ScaleUpCommand)) == 1, 5, "re-placed on host-c"
                )
                await eventually(lambda: [t.ev.host for t in sc.view.live("llm")] == ["host-c"])
            assert len(stuck.commands(bus.ScaleUpCommand)) == 1


async def test_leader_handover_sends_no_duplicates(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, SPEC)
    a = FakeHost(settings, "host-a", gpus=8, ready_after_s=0.5)
    one, two = Scaler(settings, CFG), Scaler(settings, CFG)
    stop_one = asyncio.Event()
    task_one = asyncio.create_task(one.run(stop_one))
    await eventually(lambda: one.leader, 5, "first scaler leads")
    async with running(a.run, two.run):
        await eventually(lambda: two.ready.is_set() and "host-a" in two.view.hosts)
        assert not two.leader
        # a burst: three in flight at once, and it goes on; the leader places three replicas
        feed = asyncio.create_task(send_traffic(the_bus, "llm", 6.0, concurrency=3.0))
        await eventually(lambda: len(a.commands(bus.ScaleUpCommand)) == 3, 5)
        # kill the leader mid-way (its replicas still starting): no clean lease release
        t_kill = time.monotonic()
        await one.bus.nc.close()
        task_one.cancel()
        with contextlib.suppress(BaseException):
            await task_one
        await eventually(lambda: two.leader, 6, "standby takes over")
        took = time.monotonic() - t_kill
        assert took < 4 * CFG.lease_s, took
        await eventually(
            lambda: sum(1 for t in two.view.of("llm") if t.ev.state is bus.ReplicaState.READY) == 3, 10
        )
        await feed
        restores = [c for c in a.commands(bus.ScaleUpCommand) if isinstance(c, bus.ScaleUpCommand)]
        assert len({c.replica for c in restores}) == 3
        assert len(restores) == 3, "a re-sent command must be deduplicated by its id"
        assert two.view.live_count("llm") == 3


async def test_decision_span_continues_traffic_and_travels_in_commands(
    the_bus: Bus, settings: Settings
) -> None:
    mem = memory_spans()
    await deploy(the_bus, SPEC)
    a = FakeHost(settings, "host-a")
    sc = Scaler(settings, CFG)
    seen: list[dict[str, str]] = []

    async def tap(m: Msg) -> None:
        seen.append(dict(m.headers or {}))

    sub = await the_bus.nc.subscribe(the_bus.subjects.cmd(Verb.SCALE_UP, "host-a"), cb=tap)
    async with running(a.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        with telemetry.tracer("gateway").start_as_current_span("traffic") as gw:
            await bus.publish_core(
                the_bus, the_bus.subjects.traffic("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0)
            )
        await eventually(lambda: len(seen) == 1)
    await sub.unsubscribe()
    decisions = [s for s in mem.get_finished_spans() if s.name == "scaler.decision"]
    assert len(decisions) == 1
    d = decisions[0]
    assert d.attributes is not None and d.attributes["snapscale.scale.what"] == "activate"
    assert d.attributes["snapscale.deployment"] == "llm"
    assert d.context is not None and d.parent is not None
    # the decision continues the traffic's trace, and the command carries the decision onwards
    assert d.context.trace_id == gw.get_span_context().trace_id
    assert d.parent.span_id == gw.get_span_context().span_id
    assert f"{d.context.span_id:016x}" in seen[0]["traceparent"]


async def test_restart_rebuilds_from_kv_and_holds_scale_down_for_a_stable_window(
    the_bus: Bus, settings: Settings
) -> None:
    """Two ready replicas in KV, no traffic at all: a fresh scaler keeps them a stable window."""
    spec_ = replace(
        SPEC, scaling=replace(FAST, stable_window_s=2.0, scale_to_zero_after_s=0.0, min_replicas=1)
    )
    await deploy(the_bus, spec_)
    a = FakeHost(settings, "host-a", gpus=4)
    async with running(a.run):
        await eventually(lambda: a._bus is not None)
        for r in ("llm-r1", "llm-r2"):
            a.live[r] = bus.ReplicaSummary("llm", r, bus.ReplicaState.READY, [f"host-a-g{r[-1]}"])
            await a.record(
                bus.ReplicaEvent(
                    "llm", r, "host-a", bus.ReplicaState.READY, time.time(), gpu_uuids=[f"host-a-g{r[-1]}"]
                )
            )
        sc = Scaler(settings, CFG)
        async with running(sc.run):
            await eventually(lambda: sc.leader)
            t0 = time.monotonic()
            assert sc.view.live_count("llm") == 2
            await eventually(lambda: bool(a.commands(bus.ReleaseCommand)), 5, "a release after the window")
            waited = time.monotonic() - t0
            assert waited >= 1.5, f"released after {waited:.2f}s, inside the stable window"
            await asyncio.sleep(0.5)
            assert len(a.commands(bus.ReleaseCommand)) == 1  # down to min_replicas, not below
            assert not a.commands(bus.ScaleUpCommand)


async def test_a_removed_deployment_is_drained_without_freeze(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, replace(SPEC, scaling=replace(FAST, scale_to_zero_after_s=60.0)))
    a = FakeHost(settings, "host-a")
    sc = Scaler(settings, CFG)
    async with running(a.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        await send_traffic(the_bus, "llm", 0.5)
        await eventually(lambda: [t.ev.state for t in sc.view.of("llm")] == [bus.ReplicaState.READY])
        await the_bus.kv[Bucket.DEPLOYMENTS].delete("llm")
        await eventually(
            lambda: bool(a.commands(bus.ReleaseCommand)), 5, "the release of a removed deployment"
        )
        await eventually(lambda: "llm" not in sc.view.specs, 5, "forgotten once drained")
        assert not a.commands(bus.FreezeCommand)
        assert not a.commands(bus.PrefetchCommand)
        # its traffic is now unknown: counted and dropped
        await bus.publish_core(
            the_bus, the_bus.subjects.traffic("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0)
        )
        await eventually(lambda: sc.stats().get("traffic.unknown") == 1)


async def seed(host: FakeHost, replica: str, state: bus.ReplicaState) -> None:
    """A replica the host has, in its inventory and in KV, as if from before the scaler started."""
    gpus = [f"{host.name}-g{len(host.live)}"]
    host.live[replica] = bus.ReplicaSummary("llm", replica, state, gpus, rss_bytes=1 << 20)
    await host.record(bus.ReplicaEvent("llm", replica, host.name, state, time.time(), gpu_uuids=gpus))


@pytest.mark.parametrize("spec_first", [True, False], ids=["removed-while-running", "removed-while-down"])
async def test_a_removed_deployment_stops_its_suspended_replicas_too(
    the_bus: Bus, settings: Settings, spec_first: bool
) -> None:
    """`snapscale undeploy` leaves nothing on the hosts: a suspended replica holds host RAM, and a
    ready one is stopped, not suspended, though release_mode and the budget would allow it. Also
    when the spec went while no scaler ran (its replicas are still in KV)."""
    a = FakeHost(settings, "host-a", gpus=4, suspend_budget=1 << 30)
    if spec_first:
        await deploy(the_bus, replace(SPEC, scaling=replace(FAST, release_mode="auto")))
    async with running(a.run):
        await eventually(lambda: a._bus is not None)
        await seed(a, "llm-s1", bus.ReplicaState.SUSPENDED)
        await seed(a, "llm-r1", bus.ReplicaState.READY)
        sc = Scaler(settings, CFG)
        async with running(sc.run):
            await eventually(lambda: sc.leader and len(list(sc.view.of("llm"))) == 2)
            if spec_first:
                await the_bus.kv[Bucket.DEPLOYMENTS].delete("llm")
            await eventually(lambda: not a.live, 10, "both replicas released")
            await eventually(lambda: "llm" not in sc.view.specs, 5, "forgotten once drained")
    released = {c.replica: c.mode for c in a.commands(bus.ReleaseCommand)}  # type: ignore[attr-defined]
    assert released == {"llm-s1": bus.ReleaseMode.STOP, "llm-r1": bus.ReleaseMode.STOP}
    assert not a.commands(bus.FreezeCommand) and not a.commands(bus.PrefetchCommand)


async def test_a_heartbeat_reporting_room_places_what_found_none(the_bus: Bus, settings: Settings) -> None:
    """Traffic that arrives while the only host is full is placed as soon as a heartbeat reports
    room, not at the next traffic event or tick (ticks are 30 s apart here)."""
    await deploy(the_bus, SPEC)
    host = FakeHost(settings, "host-a", gpus=0)  # full: no free GPU yet
    sc = Scaler(settings, replace(CFG, tick_s=30.0))
    async with running(host.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        await bus.publish_core(
            the_bus, the_bus.subjects.traffic("llm"), bus.TrafficEvent("llm", time.time(), 1, 1.0)
        )
        await eventually(lambda: sc.counters["unplaceable"] >= 1, 5, "the activation found no room")
        assert not host.commands(bus.ScaleUpCommand)
        host.gpus = 1  # a release finished: the next heartbeat reports a free GPU
        waited = await eventually(
            lambda: bool(host.commands(bus.ScaleUpCommand)), 5, "placed on the freed GPU"
        )
        assert waited < 2.0
