"""The NATS edges against a real nats-server with JetStream: publish, durable consumers, dedup,
KV compare-and-set, poison messages, trace context across a hop, and the consumer loop's options
(concurrency, in-progress keepalive, a server restart)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import NatsServer, start_nats, start_nats_cluster
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js.errors import KeyNotFoundError, NoKeysError, NoStreamResponseError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from snapscale.demo.procs import free_port, wait_port
from snapscale.shared import bus
from snapscale.shared.bus.messages import ScaleUpCommand, TrafficEvent
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.errors import ConfigError, RetryableError
from snapscale.shared.core.settings import Settings


def _cmd(i: str) -> ScaleUpCommand:
    return ScaleUpCommand(id=i, deployment="d", replica=f"r-{i}", issued_at=1.0)


async def _run_consumer(
    the_bus: bus.Bus, got: list[ScaleUpCommand], n: int, durable: str = "restorer-h"
) -> None:
    stop = asyncio.Event()

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        got.append(cmd)
        await msg.ack_sync()
        if len(got) >= n:
            stop.set()

    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    await asyncio.wait_for(bus.consume(the_bus, subject, durable, ScaleUpCommand, handler, stop=stop), 20)


async def test_publish_and_durable_consume_round_trip(the_bus: bus.Bus) -> None:
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    await bus.publish(the_bus, subject, _cmd("a"), msg_id="a")
    await bus.publish(the_bus, subject, _cmd("a"), msg_id="a")  # duplicate id: dropped by the stream
    await bus.publish(the_bus, subject, _cmd("b"), msg_id="b")
    got: list[ScaleUpCommand] = []
    await _run_consumer(the_bus, got, 2)
    assert [c.id for c in got] == ["a", "b"]
    info = await the_bus.js.stream_info(the_bus.subjects.cmd_stream)
    assert info.state.messages == 0  # work queue: acked commands are gone
    # the durable consumer remembers its position: nothing is delivered twice
    ci = await the_bus.js.consumer_info(the_bus.subjects.cmd_stream, "restorer-h")
    assert ci.num_ack_pending == 0 and ci.num_pending == 0


async def test_malformed_message_is_terminated_and_loop_goes_on(
    the_bus: bus.Bus, caplog: pytest.LogCaptureFixture
) -> None:
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    await the_bus.js.publish(subject, b'{"v":1,"type":"scale-up","id":42}')
    await the_bus.js.publish(subject, b"\xff garbage")
    await bus.publish(the_bus, subject, _cmd("good"), msg_id="good")
    got: list[ScaleUpCommand] = []
    await _run_consumer(the_bus, got, 1)
    assert [c.id for c in got] == ["good"]
    refused = [r.getMessage() for r in caplog.records if "refused message" in r.getMessage()]
    assert len(refused) == 2
    assert any("scale-up.id" in m for m in refused)
    assert any("not JSON" in m for m in refused)


async def test_handler_crash_does_not_stop_the_loop(the_bus: bus.Bus) -> None:
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    for i in ("boom", "ok"):
        await bus.publish(the_bus, subject, _cmd(i), msg_id=i)
    seen: list[str] = []
    stop = asyncio.Event()

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        seen.append(cmd.id)
        if cmd.id == "boom":
            raise RuntimeError("handler bug")
        stop.set()

    await asyncio.wait_for(bus.consume(the_bus, subject, "d2", ScaleUpCommand, handler, stop=stop), 20)
    assert seen == ["boom", "ok"]


async def test_retryable_error_redelivers(the_bus: bus.Bus) -> None:
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    await bus.publish(the_bus, subject, _cmd("x"), msg_id="x")
    attempts: list[int] = []
    stop = asyncio.Event()

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        attempts.append(msg.metadata.num_delivered)
        if len(attempts) == 1:
            raise RetryableError("later", delay_s=0.1)
        stop.set()

    await asyncio.wait_for(bus.consume(the_bus, subject, "d3", ScaleUpCommand, handler, stop=stop), 20)
    assert attempts == [1, 2]


async def test_kv_compare_and_set_conflict(the_bus: bus.Bus) -> None:
    kv = the_bus.kv[Bucket.REPLICAS]
    rev1 = await bus.kv_cas(kv, "r1", b"pending", None)
    with pytest.raises(RetryableError):
        await bus.kv_cas(kv, "r1", b"other", None)  # create on an existing key
    rev2 = await bus.kv_cas(kv, "r1", b"restoring", rev1)
    with pytest.raises(RetryableError, match="written concurrently"):
        await bus.kv_cas(kv, "r1", b"stale writer", rev1)
    got = await bus.kv_get(kv, "r1")
    assert got == (b"restoring", rev2)


async def test_kv_reads_see_a_key_the_watchers_first_read_missed(
    the_bus: bus.Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's keys()/history() can end before the consumer's first message is handed over and
    answer "no keys" for a key just written (its watcher's init race); kv_keys/kv_history check an
    empty answer against a consumer-less read and read again. The race is made certain here by
    having the first read of each answer as the race does."""
    kv = the_bus.kv[Bucket.DEPLOYMENTS]
    assert await bus.kv_keys(kv) == [] and await bus.kv_history(kv, "d") == []  # truly empty
    await kv.put("d", b"v1")
    await kv.put("d", b"v2")
    await kv.put("gone", b"x")
    await kv.delete("gone")
    for name in ("keys", "history"):
        real = getattr(type(kv), name)
        missed: list[bool] = []

        async def racy(self: object, *a: object, _real: object = real, _m: list[bool] = missed) -> object:
            if not _m:
                _m.append(True)
                raise NoKeysError
            return await _real(self, *a)  # type: ignore[operator]

        monkeypatch.setattr(type(kv), name, racy)
    assert await bus.kv_keys(kv) == ["d"]  # a deleted key is not listed
    assert [e.value for e in await bus.kv_history(kv, "d")] == [b"v1", b"v2"]
    assert [e.operation for e in await bus.kv_history(kv, "gone")] == [None, "DEL"]
    assert await bus.kv_history(kv, "never") == []


async def test_core_subscriber_counts_and_drops_malformed(the_bus: bus.Bus) -> None:
    seen: list[TrafficEvent] = []
    done = asyncio.Event()

    async def handler(ev: TrafficEvent, _m: Msg) -> None:
        seen.append(ev)
        done.set()

    subject = the_bus.subjects.traffic("d")
    sub, counters = await bus.subscribe_core(the_bus, subject, TrafficEvent, handler)
    await the_bus.nc.publish(subject, b'{"v":1,"type":"traffic","deployment":"d"}')  # ts missing
    await the_bus.nc.publish(subject, b"{")
    await bus.publish_core(the_bus, subject, TrafficEvent(deployment="d", ts=1.0, arrivals=2))
    await asyncio.wait_for(done.wait(), 5)
    await the_bus.nc.flush()
    assert counters == {"ok": 1, "malformed": 2, "failed": 0}
    assert seen[0].arrivals == 2
    with contextlib.suppress(Exception):
        await sub.unsubscribe()  # type: ignore[attr-defined]


async def test_trace_context_crosses_the_bus(the_bus: bus.Bus) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    with tracer.start_as_current_span("decision") as parent:
        await bus.publish(the_bus, subject, _cmd("t"), msg_id="t")
    stop = asyncio.Event()
    child_parent: list[int] = []

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        with tracer.start_as_current_span("restore") as span:
            child_parent.append(span.get_span_context().trace_id)
        stop.set()

    await asyncio.wait_for(bus.consume(the_bus, subject, "d4", ScaleUpCommand, handler, stop=stop), 20)
    assert child_parent == [parent.get_span_context().trace_id]
    restore_span = next(s for s in exporter.get_finished_spans() if s.name == "restore")
    assert restore_span.parent is not None
    assert restore_span.parent.span_id == parent.get_span_context().span_id
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_a_stopped_consumer_lets_the_connection_drain_quickly(settings: Settings) -> None:
    b = await bus.open_bus(settings, "drain-test")
    stop = asyncio.Event()

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        pass

    task = asyncio.create_task(
        bus.consume(b, b.subjects.cmd(Verb.SCALE_UP, "h"), "drain", ScaleUpCommand, handler, stop=stop)
    )
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 5)
    t0 = time.monotonic()
    await b.close()
    assert time.monotonic() - t0 < 5.0  # a pull subscription left open makes drain wait ~30 s


async def test_no_more_messages_are_handled_or_fetched_than_the_concurrency(the_bus: bus.Bus) -> None:
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    ids = [f"c{i}" for i in range(6)]
    for i in ids:
        await bus.publish(the_bus, subject, _cmd(i), msg_id=i)
    stop = asyncio.Event()
    running: list[str] = []
    peak = 0
    held_by_server: list[int] = []  # delivered to this consumer and not yet acked, seen mid-handler
    done: list[str] = []

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        nonlocal peak
        running.append(cmd.id)
        peak = max(peak, len(running))
        ci = await the_bus.js.consumer_info(the_bus.subjects.cmd_stream, "conc")
        held_by_server.append(ci.num_ack_pending)
        await asyncio.sleep(0.3)
        running.remove(cmd.id)
        done.append(cmd.id)
        if len(done) == len(ids):
            stop.set()

    await asyncio.wait_for(
        bus.consume(the_bus, subject, "conc", ScaleUpCommand, handler, concurrency=2, stop=stop), 20
    )
    assert sorted(done) == ids
    assert peak == 2  # two at once, never three
    assert max(held_by_server) <= 2  # a message is fetched only once a slot is free for it
    ci = await the_bus.js.consumer_info(the_bus.subjects.cmd_stream, "conc")
    assert ci.num_ack_pending == 0 and ci.num_pending == 0 and ci.num_redelivered == 0


@pytest.mark.parametrize("keepalive", [True, False])
async def test_keepalive_keeps_a_slow_handlers_message_from_being_redelivered(
    the_bus: bus.Bus, keepalive: bool
) -> None:
    # the handler outlasts the 1 s ack wait twice over; a second slot would take a redelivery
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    await bus.publish(the_bus, subject, _cmd("slow"), msg_id="slow")
    stop = asyncio.Event()
    deliveries: list[int] = []

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        if len(deliveries) == 1:
            await asyncio.sleep(2.5)
        stop.set()

    durable = f"slow-{keepalive}"
    await asyncio.wait_for(
        bus.consume(
            the_bus, subject, durable, ScaleUpCommand, handler,
            ack_wait_s=1.0, concurrency=2, keepalive=keepalive, stop=stop,
        ),
        20,
    )  # fmt: skip
    ci = await the_bus.js.consumer_info(the_bus.subjects.cmd_stream, durable)
    if keepalive:
        assert deliveries == [1] and ci.num_redelivered == 0
    else:  # the control: without in-progress the server offers it again while it is handled
        assert deliveries == [1, 2]
    assert ci.num_ack_pending == 0 and ci.num_pending == 0


async def test_bad_messages_are_terminated_while_the_loop_handles_the_rest_at_once(
    the_bus: bus.Bus, caplog: pytest.LogCaptureFixture
) -> None:
    subject = the_bus.subjects.cmd(Verb.SCALE_UP, "h")
    await bus.publish(the_bus, subject, _cmd("g1"), msg_id="g1")
    await the_bus.js.publish(subject, b"{not json")
    await the_bus.js.publish(subject, b'{"v":1,"type":"scale-up","id":"x","deployment":"d","replica":"r"}')
    await bus.publish(the_bus, subject, _cmd("boom"), msg_id="boom")
    await bus.publish(the_bus, subject, _cmd("g2"), msg_id="g2")
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        seen.append(cmd.id)
        if sorted(seen) == ["boom", "g1", "g2"]:
            stop.set()
        if cmd.id == "boom":
            raise RuntimeError("handler bug")
        await asyncio.sleep(0.1)

    await asyncio.wait_for(
        bus.consume(
            the_bus, subject, "bad", ScaleUpCommand, handler, concurrency=3, keepalive=True, stop=stop
        ),
        20,
    )
    assert sorted(seen) == ["boom", "g1", "g2"]
    refused = [r for r in caplog.records if r.getMessage().startswith("refused message")]
    got = sorted((getattr(r, "field", None), str(getattr(r, "reason", ""))[:8]) for r in refused)
    assert got == [("<body>", "not JSON"), ("scale-up.issued_at", "missing")]
    # every message answered once: the bad ones and the crashed one terminated, the rest acked
    ci = await the_bus.js.consumer_info(the_bus.subjects.cmd_stream, "bad")
    assert ci.num_ack_pending == 0 and ci.num_pending == 0 and ci.num_redelivered == 0
    info = await the_bus.js.stream_info(the_bus.subjects.cmd_stream)
    assert info.state.messages == 0


async def test_the_loop_outlives_a_server_restart_and_ends_with_its_connection(
    settings: Settings, tmp_path: Path
) -> None:
    # a private nats-server, restarted on the same port and store while the loop runs
    srv = start_nats(tmp_path)
    argv = [str(a) for a in srv.proc.args]  # type: ignore[union-attr]
    procs = [srv.proc]
    b = await bus.open_bus(replace(settings, nats_url=srv.url), "restart-test")
    subject = b.subjects.cmd(Verb.SCALE_UP, "h")
    seen: list[str] = []
    arrived = asyncio.Event()

    async def handler(cmd: ScaleUpCommand, msg: Msg) -> None:
        seen.append(cmd.id)
        arrived.set()

    loop = asyncio.create_task(bus.consume(b, subject, "restart", ScaleUpCommand, handler))
    try:
        await bus.publish(b, subject, _cmd("before"), msg_id="before")
        await asyncio.wait_for(arrived.wait(), 10)
        srv.proc.terminate()
        srv.proc.wait(10)
        await asyncio.sleep(1.5)  # the loop's fetches fail meanwhile
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # noqa: ASYNC220
        await asyncio.to_thread(wait_port, srv.port)
        arrived.clear()
        for _ in range(100):  # publish once the client has reconnected
            try:
                await bus.publish(b, subject, _cmd("after"), msg_id="after")
                break
            except Exception:
                await asyncio.sleep(0.2)
        await asyncio.wait_for(arrived.wait(), 30)
        assert seen == ["before", "after"] and not loop.done()
        await b.nc.close()
        await asyncio.wait_for(loop, 5)  # a closed connection ends the loop, no stop needed
    finally:
        loop.cancel()
        await b.close()
        for p in procs:
            p.terminate()
            p.wait(10)


async def _until_jetstream(settings: Settings, timeout_s: float = 30.0) -> None:
    """A new cluster answers JetStream requests once it has elected a meta leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        nc = await bus.connect(settings, "probe")
        try:
            await nc.jetstream().account_info()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await nc.close()


async def test_streams_and_buckets_follow_js_replicas_on_a_cluster(tmp_path: Path, namespace: str) -> None:
    cluster = start_nats_cluster(tmp_path)
    try:
        for n in cluster.nodes:
            await asyncio.to_thread(wait_port, n.port)
        one = Settings(nats_url=cluster.url, namespace=namespace, js_replicas=1)
        await _until_jetstream(one)
        b = await bus.open_bus(one, "first")  # as a single server's services made them
        kv_streams = [f"KV_{b.subjects.bucket(k)}" for k in Bucket]
        names = [b.subjects.cmd_stream, b.subjects.evt_stream, *kv_streams]
        assert {(await b.js.stream_info(n)).config.num_replicas for n in names} == {1}
        await b.close()

        b = await bus.open_bus(replace(one, js_replicas=3), "second")
        try:
            assert {(await b.js.stream_info(n)).config.num_replicas for n in names} == {3}
        finally:
            await b.close()
    finally:
        cluster.stop()


async def test_a_server_list_connects_past_a_server_that_is_down(
    nats_server: NatsServer, namespace: str
) -> None:
    down = f"nats://127.0.0.1:{free_port()}"
    s = Settings(nats_url=f"{down}, {nats_server.url}", namespace=namespace)
    assert s.nats_servers == [down, nats_server.url]
    b = await bus.open_bus(s, "listed")
    try:
        assert b.nc.connected_url is not None and b.nc.connected_url.port == nats_server.port
    finally:
        await b.close()


def test_js_replicas_beyond_the_cluster_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="SNAPSCALE_JS_REPLICAS=7"):
        Settings(js_replicas=7)


async def test_requests_are_sent_again_through_a_leader_election_and_only_then() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:  # what JetStream answers while a stream has no leader
            raise NoRespondersError if len(calls) == 1 else NoStreamResponseError
        return "stored"

    assert await bus.through_elections("test", flaky) == "stored" and len(calls) == 3

    async def down() -> None:
        raise NoRespondersError

    t0 = time.monotonic()
    with pytest.raises(NoRespondersError):
        await bus.through_elections("test", down, budget_s=0.5)
    assert time.monotonic() - t0 < 2.0

    async def missing() -> None:
        calls.append(1)
        raise KeyNotFoundError  # an answer, not an outage: never repeated

    calls.clear()
    with pytest.raises(KeyNotFoundError):
        await bus.through_elections("test", missing)
    assert len(calls) == 1
