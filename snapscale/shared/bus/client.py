"""NATS edges: connect, ensure streams and KV buckets exist, publish with dedup ids and trace
context, subscribe on core NATS. The JetStream consumer loop is consumer.py's.

A lost connection is retried forever, but one the server closes with a protocol error (a line
too long, an authorization revoked) nats-py never reopens: a service whose bus is closed that way
stops and exits non-zero (`BusLost`), so its supervisor restarts it, instead of running on deaf.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from snapscale.shared.bus.messages import M, decode_message, encode_message
from snapscale.shared.bus.subjects import Bucket, Subjects
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import MessageError, RetryableError, SnapscaleError
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)

HOSTS_TTL_S = 15.0
DEDUP_WINDOW_S = 600.0


class BusLost(SnapscaleError):
    """The NATS connection was closed for good while the service ran: it cannot hear or answer."""


async def connect(
    settings: Settings, name: str, *, on_closed: Callable[[], Awaitable[None]] | None = None
) -> NATS:
    """Connect with unbounded reconnects; connection trouble is logged, never raised later.
    `on_closed` runs once the connection is closed for good, whoever closed it."""

    async def on_error(e: Exception) -> None:
        log.warning("nats: %s", e)

    async def on_disconnect() -> None:
        log.warning("nats: disconnected from %s", settings.nats_url)

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        closed_cb=on_closed,
    )


@dataclass
class Bus:
    """A connection with its JetStream context, subject names and KV buckets."""

    nc: NATS
    js: JetStreamContext
    subjects: Subjects
    kv: dict[Bucket, KeyValue]
    lost: str | None = None  # why the connection closed while the service ran (open_bus's `stop`)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    def raise_if_lost(self) -> None:
        """At the end of a service's run: raise `BusLost` if the connection closed under it."""
        if self.lost is not None:
            raise BusLost(self.lost)


async def open_bus(settings: Settings, name: str, *, stop: asyncio.Event | None = None) -> Bus:
    """Connect and ensure the topology. With `stop` (a service's), a connection closed for good
    before `stop` is set is a loss: it is logged, recorded in `Bus.lost` and sets `stop`, so the
    service winds down and ends with `raise_if_lost`."""
    opened: Bus | None = None

    async def closed() -> None:
        if stop is None or stop.is_set() or opened is None:
            return
        opened.lost = (
            f"the NATS connection to {settings.nats_url} was closed for good "
            f"({opened.nc.last_error or 'no reason given'}); stopping so a supervisor restarts this service"
        )
        log.error("%s", opened.lost)
        stop.set()

    nc = await connect(settings, name, on_closed=closed)
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    kv = await ensure_topology(js, subjects)
    opened = Bus(nc=nc, js=js, subjects=subjects, kv=kv)
    return opened


async def ensure_topology(js: JetStreamContext, s: Subjects) -> dict[Bucket, KeyValue]:
    """Create (or leave as they are) the command and event streams and the KV buckets."""
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=s.cmd_stream,
            subjects=[s.cmd_all()],
            retention=api.RetentionPolicy.WORK_QUEUE,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=24 * 3600,
        ),
    )
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=s.evt_stream,
            subjects=[s.evt_replica_all(), s.evt_checkpoint_all()],
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=7 * 24 * 3600,
        ),
    )
    out: dict[Bucket, KeyValue] = {}
    for b in Bucket:
        ttl = HOSTS_TTL_S if b is Bucket.HOSTS else None
        history = 5 if b in (Bucket.CHECKPOINTS, Bucket.DEPLOYMENTS) else 1
        try:
            out[b] = await js.key_value(s.bucket(b))
        except (NotFoundError, BadRequestError):
            try:
                out[b] = await js.create_key_value(bucket=s.bucket(b), ttl=ttl, history=history)
            except BadRequestError:  # created concurrently by another process
                out[b] = await js.key_value(s.bucket(b))
    return out


async def _ensure_stream(js: JetStreamContext, cfg: api.StreamConfig) -> None:
    assert cfg.name is not None
    try:
        await js.stream_info(cfg.name)
    except NotFoundError:
        try:
            await js.add_stream(cfg)
        except BadRequestError:
            await js.stream_info(cfg.name)  # another process won the race


async def publish(
    bus: Bus, subject: str, msg: object, *, msg_id: str | None = None, headers: dict[str, str] | None = None
) -> None:
    """Publish to JetStream with the current trace context; `msg_id` makes redelivery a no-op."""
    hdrs = telemetry.inject(dict(headers or {}))
    if msg_id:
        hdrs["Nats-Msg-Id"] = msg_id
    await bus.js.publish(subject, encode_message(msg), headers=hdrs)  # type: ignore[arg-type]


async def publish_core(bus: Bus, subject: str, msg: object) -> None:
    """Fire-and-forget on core NATS (heartbeats, traffic), with trace context."""
    await bus.nc.publish(subject, encode_message(msg), headers=telemetry.inject({}))  # type: ignore[arg-type]


async def kv_cas(kv: KeyValue, key: str, value: bytes, last_revision: int | None) -> int:
    """Compare-and-set: create when `last_revision` is None, else update only at that revision.

    Raises `RetryableError` when someone else wrote first; re-read and decide again.
    """
    try:
        if last_revision is None:
            return await kv.create(key, value)
        return await kv.update(key, value, last=last_revision)
    except KeyWrongLastSequenceError as e:
        raise RetryableError(f"kv {key}: written concurrently ({e.description})", delay_s=0.0) from None
    except BadRequestError as e:
        # kv.create on an existing key answers "wrong last sequence" as a bad request in some servers
        raise RetryableError(f"kv {key}: {e.description}", delay_s=0.0) from None


async def kv_get(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    try:
        e = await kv.get(key)
    except KeyNotFoundError:
        return None
    if e.value is None:
        return None
    return e.value, e.revision or 0


async def subscribe_core(
    bus: Bus, subject: str, cls: type[M], handler: Callable[[M, Msg], Awaitable[None]]
) -> tuple[object, dict[str, int]]:
    """A core-NATS subscription whose malformed messages are counted and dropped.

    Returns the subscription and its counters (`ok`, `malformed`, `failed`).
    """
    counters = {"ok": 0, "malformed": 0, "failed": 0}

    async def cb(m: Msg) -> None:
        try:
            decoded = decode_message(m.data, cls)
        except MessageError as e:
            counters["malformed"] += 1
            log.warning("dropped malformed message on %s: %s", m.subject, e)
            return
        try:
            await handler(decoded, m)
            counters["ok"] += 1
        except Exception:
            counters["failed"] += 1
            log.exception("handler failed on %s", m.subject)

    sub = await bus.nc.subscribe(subject, cb=cb)
    return sub, counters
