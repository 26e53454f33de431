"""The NATS edges against a real nats-server with JetStream: publish, durable consumers, dedup,
KV compare-and-set, poison messages, and trace context across a hop."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from snapscale.shared import bus
from snapscale.shared.bus.messages import ScaleUpCommand, TrafficEvent
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.errors import RetryableError
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
    assert any("restore.id" in m for m in refused)
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
