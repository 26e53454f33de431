"""`snapscale.client` on a real nats-server: each verb's answer, its errors (bad input refused before
anything connects, not found, unavailable), and that a reader leaves the server as it was. The
services are stand-ins on the wire (the scaler is the real one where undeploy needs it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError as NoStream
from test_scaler_service import CFG, FAST, SPEC, FakeHost, eventually, running, seed

from snapscale.client import (
    Client,
    ConfigError,
    DeploymentSpec,
    NotFoundError,
    Progress,
    ReplicaState,
    UnavailableError,
)
from snapscale.demo.procs import free_port
from snapscale.scaler.service import Scaler
from snapscale.shared import bus
from snapscale.shared.bus import (
    Bucket,
    CatalogEntry,
    CheckpointEvent,
    FreezeCommand,
    HostHeartbeat,
    PrefetchCommand,
    ReleaseCommand,
    ReleaseMode,
    ReplicaEvent,
    TrafficEvent,
    decode_message,
    encode_message,
    publish_entry,
)
from snapscale.shared.bus.client import Bus
from snapscale.shared.core.settings import Settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings) as c:
        yield c


def dead(settings: Settings) -> Settings:
    return replace(settings, nats_url=f"nats://127.0.0.1:{free_port()}")


async def test_deploy_list_and_redeploy(client: Client, settings: Settings) -> None:
    spec = DeploymentSpec(name="web", command=["serve"])
    first = await client.deploy(spec)
    assert (first.name, first.change, first.spec_hash) == ("web", "new", spec.spec_hash())
    assert (await client.deploy(spec)).change == "unchanged"
    changed = await client.deploy(replace(spec, port=9000))
    assert changed.change == "updated" and changed.revision > first.revision
    [d] = await client.deployments()
    assert d.name == "web" and d.spec is not None and d.spec.port == 9000 and d.replicas == []


async def test_a_reader_creates_nothing(settings: Settings) -> None:
    """`status` and `deployments` on a server nothing wrote to: empty answers, no stream or bucket."""
    async with Client(settings) as c:
        st = await c.status()
        assert (st.hosts, st.replicas, st.checkpoints) == ([], [], [])
        assert await c.deployments() == []
    probe = await bus.open_bus(settings, "probe", create=False, operator=True)
    try:
        assert probe.kv == {}
        with pytest.raises(NoStream):
            await probe.js.stream_info(probe.subjects.cmd_stream)
    finally:
        await probe.close()


async def test_bad_input_is_refused_before_connecting(settings: Settings) -> None:
    """With NATS unreachable, bad arguments still get their own error: nothing was tried."""
    async with Client(dead(settings)) as c:
        with pytest.raises(ConfigError, match="subject token"):
            await c.undeploy("a.b")
        with pytest.raises(ConfigError, match="subject token"):
            await c.freeze("llm", replica="../x")
        with pytest.raises(ConfigError, match="rps must be a number"):
            await c.traffic("llm", rps=float("nan"), concurrency=1, duration_s=1)
        with pytest.raises(ConfigError, match="replicas must be at least 1"):
            await c.wait_ready("llm", replicas=0)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="is unreachable"):
            await c.status()
        assert time.monotonic() - t0 < 6


async def test_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError, match="deployment ghost is not deployed"):
        await client.undeploy("ghost")
    with pytest.raises(NotFoundError, match="not deployed"):
        await client.wait_ready("ghost")
    with pytest.raises(NotFoundError, match="no ready replica of ghost"):
        await client.freeze("ghost")
    with pytest.raises(NotFoundError, match="host h9 is not reporting"):
        await client.prefetch("ghost", "h9")


async def test_wait_ready(client: Client, the_bus: Bus) -> None:
    await client.deploy(SPEC)
    seen: list[Progress] = []
    with pytest.raises(TimeoutError, match=r"0 of 1 replicas of llm ready after 0.3s \(replicas: none"):
        await client.wait_ready("llm", timeout_s=0.3, on_progress=seen.append)
    assert seen and seen[-1] == Progress("waiting for llm", 0, 1, "replicas")
    ev = ReplicaEvent("llm", "llm-1", "h1", ReplicaState.READY, time.time(), endpoint="10.0.0.2:8000")
    await the_bus.kv[Bucket.REPLICAS].put("llm.llm-1", encode_message(ev))
    [ready] = await client.wait_ready("llm", timeout_s=5)
    assert ready.replica == "llm-1" and ready.endpoint == "10.0.0.2:8000"


async def test_traffic_publishes_with_progress(client: Client, the_bus: Bus) -> None:
    got: list[TrafficEvent] = []

    async def cb(m: Msg) -> None:
        got.append(decode_message(m.data, TrafficEvent))

    sub = await the_bus.nc.subscribe(the_bus.subjects.traffic("llm"), cb=cb)
    await the_bus.nc.flush()
    seen: list[Progress] = []
    n = await client.traffic("llm", rps=20, concurrency=2, duration_s=0.5, on_progress=seen.append)
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    assert n == len(got) == 10 and sum(e.arrivals for e in got) == 10
    assert [p.done for p in seen] == list(range(1, 11)) and {p.total for p in seen} == {10}


async def answer_freezes(b: Bus, host: str, stop: asyncio.Event, ok: bool = True) -> None:
    """A freezer on the wire: each freeze command gets its checkpoint event."""

    async def on_freeze(c: FreezeCommand, _m: Msg) -> None:
        await asyncio.sleep(0.6)  # long enough for a progress tick
        ev = CheckpointEvent(
            c.deployment, host, ok, time.time(), c.id, "ck-1" if ok else None, c.replica, "k" * 64,
            reason="" if ok else "criu dump failed", sizes={"total": 3 << 20},
        )  # fmt: skip
        await bus.publish(b, b.subjects.evt_checkpoint(c.deployment), ev)

    s = b.subjects
    await bus.consume(b, s.cmd(bus.Verb.FREEZE, host), "fake-freezer", FreezeCommand, on_freeze, stop=stop)


async def test_freeze_waits_for_the_event_and_reports_time(client: Client, the_bus: Bus) -> None:
    await client.deploy(SPEC)
    ev = ReplicaEvent("llm", "llm-1", "h1", ReplicaState.READY, time.time())
    await the_bus.kv[Bucket.REPLICAS].put("llm.llm-1", encode_message(ev))
    stop = asyncio.Event()
    task = asyncio.create_task(answer_freezes(the_bus, "h1", stop))
    try:
        seen: list[Progress] = []
        got = await client.freeze("llm", timeout_s=20, on_progress=seen.append)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert got.ok and got.checkpoint_id == "ck-1" and got.replica == "llm-1" and got.host == "h1"
    assert seen[-1].what == "freezing llm/llm-1 on h1" and seen[-1].unit == "s" and seen[-1].done > 0.4


def heartbeat(host: str, *, cached: int = 0, done: bool = False) -> HostHeartbeat:
    return HostHeartbeat(
        host, time.time(), "h" * 64, compat_hashes={"llm": "k" * 64},
        cached_bytes={"ck-1": cached} if cached else {}, cached_checkpoints=["ck-1"] if done else [],
    )  # fmt: skip


async def test_prefetch_asks_the_host_and_follows_its_cache(client: Client, the_bus: Bus) -> None:
    await client.deploy(SPEC)
    hosts, catalog = the_bus.kv[Bucket.HOSTS], the_bus.kv[Bucket.CHECKPOINTS]
    await hosts.put("h1", encode_message(heartbeat("h1")))
    with pytest.raises(NotFoundError, match="no checkpoint of llm for h1's key kkkkkkkkkkkk"):
        await client.prefetch("llm", "h1")
    with pytest.raises(NotFoundError, match="h1 reports no key for other"):
        await client.prefetch("other", "h1")
    entry = CatalogEntry(
        "llm", "k" * 64, "ck-1", "manifests/llm/ck-1.json", time.time(), sizes={"unique": 4 << 20}
    )
    await publish_entry(catalog, entry)

    got_cmds: list[PrefetchCommand] = []

    async def restorer(stop: asyncio.Event) -> None:
        """A restorer on the wire: a prefetch fills its cache over two heartbeats."""

        async def on_prefetch(c: PrefetchCommand, _m: Msg) -> None:
            got_cmds.append(c)
            await hosts.put("h1", encode_message(heartbeat("h1", cached=2 << 20)))
            await asyncio.sleep(0.7)
            await hosts.put("h1", encode_message(heartbeat("h1", cached=4 << 20, done=True)))

        s = the_bus.subjects
        await bus.consume(
            the_bus, s.cmd(bus.Verb.PREFETCH, "h1"), "fake-restorer", PrefetchCommand, on_prefetch, stop=stop
        )

    seen: list[Progress] = []
    async with running(restorer):
        got = await client.prefetch("llm", "h1", timeout_s=20, on_progress=seen.append)
    assert got.done and got.sent and got.checkpoint_id == "ck-1" and got.cached_bytes == 4 << 20
    assert [(c.deployment, c.checkpoint_id) for c in got_cmds] == [("llm", "ck-1")]
    assert any(p.done == 2 << 20 and p.total == 4 << 20 and p.unit == "B" for p in seen)
    again = await client.prefetch("llm", "h1")
    assert again.done and not again.sent  # cached already: nothing sent
    assert len(got_cmds) == 1


async def test_undeploy_waits_until_every_replica_is_stopped(settings: Settings, client: Client) -> None:
    """The real scaler stops a removed deployment's replicas, the suspended one too, and the
    verb returns once KV `replicas` holds none of them."""
    a = FakeHost(settings, "host-a", gpus=4, suspend_budget=1 << 30)
    await client.deploy(replace(SPEC, scaling=replace(FAST, release_mode="auto")))
    async with running(a.run):
        await eventually(lambda: a._bus is not None)
        await seed(a, "llm-s1", ReplicaState.SUSPENDED)
        await seed(a, "llm-r1", ReplicaState.READY)
        sc = Scaler(settings, CFG)
        async with running(sc.run):
            await eventually(lambda: sc.leader and len(list(sc.view.of("llm"))) == 2)
            seen: list[Progress] = []
            u = await client.undeploy("llm", timeout_s=20, on_progress=seen.append)
    assert u.left == [] and sorted(u.released) == ["llm-r1", "llm-s1"]
    assert {c.replica: c.mode for c in a.commands(ReleaseCommand)} == {  # type: ignore[attr-defined]
        "llm-s1": ReleaseMode.STOP,
        "llm-r1": ReleaseMode.STOP,
    }
    assert seen[0] == Progress("undeploy llm: releasing replicas", 0, 2, "replicas")
    assert seen[-1].done == 2
    assert await client.deployments() == []


async def test_undeploy_with_no_scaler_says_what_is_left(client: Client, the_bus: Bus) -> None:
    await client.deploy(SPEC)
    ev = ReplicaEvent("llm", "llm-1", "h1", ReplicaState.SUSPENDED, time.time())
    await the_bus.kv[Bucket.REPLICAS].put("llm.llm-1", encode_message(ev))
    u = await client.undeploy("llm", timeout_s=0.3)
    assert u.released == [] and [(r.replica, r.state) for r in u.left] == [("llm-1", ReplicaState.SUSPENDED)]
    assert await bus.kv_get(the_bus.kv[Bucket.DEPLOYMENTS], "llm") is None
