"""NATS edges: connect, ensure streams and KV buckets exist, publish with dedup ids and trace
context, subscribe on core NATS. The JetStream consumer loop is consumer.py's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from snapscale.shared.bus.auth import connect_options
from snapscale.shared.bus.messages import M, decode_message, encode_message
from snapscale.shared.bus.subjects import Bucket, Subjects
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import MessageError, RetryableError, UnavailableError
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)

HOSTS_TTL_S = 15.0
DEDUP_WINDOW_S = 600.0
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
# An operator's verb gives up on a server it cannot reach within this (one line, exit 1) ...
OPERATOR_CONNECT_S = 5.0
# ... and, once connected, rides out a server restart of about this many reconnects x 0.5 s.
OPERATOR_RECONNECTS = 30


def check_nats_url(url: str) -> str:
    """`url` when it names a NATS server; nats-py would retry a mistyped one forever."""
    u = urlparse(url)
    if u.scheme not in NATS_SCHEMES or not u.hostname:
        raise UnavailableError(
            f"SNAPSCALE_NATS_URL={url!r} is not a NATS URL: use nats://host:4222 (or tls://, ws://, wss://)"
        )
    return url


async def connect(settings: Settings, name: str, *, operator: bool = False) -> NATS:
    """A service connects with unbounded reconnects: trouble is logged, never raised later.
    Credentials and TLS come from `settings.nats_auth` (bus/auth.py).

    An operator's verb (`operator=True`) fails fast instead: an unreachable server raises
    `UnavailableError` within OPERATOR_CONNECT_S, and reconnect attempts are not logged (the
    verb says what went wrong once). Either way, closing the connection ourselves logs nothing.
    """
    url = check_nats_url(settings.nats_url)
    nc = NATS()
    seen: list[BaseException] = []  # why each attempt failed; the last one is reported

    async def on_error(e: Exception) -> None:
        seen.append(e)
        (log.debug if operator else log.warning)("nats: %s", e)

    async def on_disconnect() -> None:
        if not nc.is_closed:  # closed means we closed it (close, drain): nothing to report
            (log.debug if operator else log.warning)("nats: disconnected from %s", url)

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    try:
        await asyncio.wait_for(
            nc.connect(
                url,
                name=name,
                max_reconnect_attempts=1 if operator else -1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py sleeps a float
                connect_timeout=2 if operator else 5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **connect_options(settings.nats_auth),
            ),
            OPERATOR_CONNECT_S if operator else None,
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        if not nc.is_closed:
            await nc.close()
        refused = [x for x in seen if "Authorization" in str(x)]
        if refused:  # nats-py reports it as a plain error, then the reset that follows it
            raise UnavailableError(f"NATS at {url} refused our credentials: {refused[-1]}") from None
        cause = seen[-1] if seen else e
        why = f"{cause}" if str(cause) else "timed out" if isinstance(cause, TimeoutError) else repr(cause)
        raise UnavailableError(f"NATS at {url} is unreachable: {why}") from None
    if operator:
        nc.options["max_reconnect_attempts"] = OPERATOR_RECONNECTS
    return nc


@dataclass
class Bus:
    """A connection with its JetStream context, subject names and KV buckets."""

    nc: NATS
    js: JetStreamContext
    subjects: Subjects
    kv: dict[Bucket, KeyValue]

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()


async def open_bus(settings: Settings, name: str, *, create: bool = True, operator: bool = False) -> Bus:
    """Connect and open the streams and buckets: created where missing (`create`), else only
    those that exist, so a verb that only reads leaves a server as it found it. `operator`: see
    `connect`. Raises `UnavailableError` when the server has no JetStream."""
    nc = await connect(settings, name, operator=operator)
    try:
        js = nc.jetstream()
        await require_jetstream(js, settings.nats_url)
        subjects = Subjects(settings.namespace)
        kv = await ensure_topology(js, subjects) if create else await existing_buckets(js, subjects)
    except BaseException:
        await nc.close()
        raise
    return Bus(nc=nc, js=js, subjects=subjects, kv=kv)


async def require_jetstream(js: JetStreamContext, url: str) -> None:
    try:
        await js.account_info()
    except (ServiceUnavailableError, nats.errors.NoRespondersError):
        raise UnavailableError(
            f"NATS at {url} has no JetStream: start nats-server with -js (or enable it for this account)"
        ) from None
    except nats.errors.TimeoutError:
        raise UnavailableError(f"NATS at {url} did not answer a JetStream request in time") from None


async def existing_buckets(js: JetStreamContext, s: Subjects) -> dict[Bucket, KeyValue]:
    """The KV buckets that exist now; none is created."""
    out: dict[Bucket, KeyValue] = {}
    for b in Bucket:
        try:
            out[b] = await js.key_value(s.bucket(b))
        except (NotFoundError, BadRequestError):
            continue
    return out


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
