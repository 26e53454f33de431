"""NATS edges: connect, ensure streams and KV buckets exist, publish with dedup ids and trace
context, subscribe on core NATS. The JetStream consumer loop is consumer.py's.

A lost connection is retried forever, but one the server closes with a protocol error (a line
too long, an authorization revoked) nats-py never reopens: a service whose bus is closed that way
stops and exits non-zero (`BusLost`), so its supervisor restarts it, instead of running on deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import (
    BadRequestError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from snapscale.shared.bus.auth import connect_options
from snapscale.shared.bus.messages import M, decode_message, encode_message
from snapscale.shared.bus.subjects import Bucket, Subjects
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import (
    ConfigError,
    MessageError,
    RetryableError,
    SnapscaleError,
    UnavailableError,
)
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)

HOSTS_TTL_S = 15.0
DEDUP_WINDOW_S = 600.0
# Longer than a JetStream cluster takes to elect a new stream leader after losing a server (its
# raft election timeout is 4-9 s): JetStream requests that fail meanwhile are sent again.
ELECTION_S = 20.0
_TRANSIENT = (NatsTimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError)
T = TypeVar("T")
# An operator's verb gives up on a server it cannot reach within this (one line, exit 1) ...
OPERATOR_CONNECT_S = 5.0
# ... and, once connected, rides out a server restart of about this many reconnects x 0.5 s.
OPERATOR_RECONNECTS = 30


class BusLost(SnapscaleError):
    """The NATS connection was closed for good while the service ran: it cannot hear or answer."""


async def connect(
    settings: Settings,
    name: str,
    *,
    operator: bool = False,
    on_closed: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """A service connects to any of the configured servers with unbounded reconnects (to another
    server of a cluster when one goes): trouble is logged, never raised later. Credentials and TLS
    come from `settings.nats_auth` (bus/auth.py). `on_closed` runs once the connection is closed for
    good, whoever closed it.

    An operator's verb (`operator=True`) fails fast instead: an unreachable server raises
    `UnavailableError` within OPERATOR_CONNECT_S, and reconnect attempts are not logged (the
    verb says what went wrong once). Either way, closing the connection ourselves logs nothing.
    """
    servers = settings.nats_servers  # checked when the settings were read (core/settings.py)
    url = ",".join(servers)
    nc = NATS()
    seen: list[BaseException] = []  # why each attempt failed; the last one is reported

    async def on_error(e: Exception) -> None:
        seen.append(e)
        (log.debug if operator else log.warning)("nats: %s", e)

    async def on_disconnect() -> None:
        if not nc.is_closed:  # closed means we closed it (close, drain): nothing to report
            (log.debug if operator else log.warning)("nats: disconnected from %s", url)

    async def on_reconnect() -> None:
        cur = nc.connected_url
        log.info("nats: reconnected to %s", cur.netloc if cur else "a server")

    try:
        await asyncio.wait_for(
            nc.connect(
                servers,
                name=name,
                max_reconnect_attempts=1 if operator else -1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py sleeps a float
                connect_timeout=2 if operator else 5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                closed_cb=on_closed,
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
    lost: str | None = None  # why the connection closed while the service ran (open_bus's `stop`)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    def raise_if_lost(self) -> None:
        """At the end of a service's run: raise `BusLost` if the connection closed under it."""
        if self.lost is not None:
            raise BusLost(self.lost)


async def open_bus(
    settings: Settings,
    name: str,
    *,
    create: bool = True,
    operator: bool = False,
    stop: asyncio.Event | None = None,
) -> Bus:
    """Connect and open the streams and buckets: created where missing (`create`, each kept on
    SNAPSCALE_JS_REPLICAS servers), else only those that exist, so a verb that only reads leaves a
    server as it found it. `operator`: see `connect`. Raises `UnavailableError` when the server has
    no JetStream. With `stop` (a service's), a connection closed for good before `stop` is set is a
    loss: it is logged, recorded in `Bus.lost` and sets `stop`, so the service winds down and ends
    with `raise_if_lost`."""
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

    nc = await connect(settings, name, operator=operator, on_closed=closed)
    try:
        js = nc.jetstream()
        await require_jetstream(js, settings.nats_url)
        subjects = Subjects(settings.namespace)
        if create:
            kv = await ensure_topology(js, subjects, replicas=settings.js_replicas)
        else:
            kv = await existing_buckets(js, subjects)
    except BaseException:
        await nc.close()
        raise
    opened = Bus(nc=nc, js=js, subjects=subjects, kv=kv)
    return opened


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


async def ensure_topology(js: JetStreamContext, s: Subjects, replicas: int = 1) -> dict[Bucket, KeyValue]:
    """Create the command and event streams and the KV buckets, each kept on `replicas` servers.

    One that exists is left as it is, except its replica count: raised or lowered to `replicas`,
    so a single server's streams follow when SNAPSCALE_JS_REPLICAS grows with a cluster.
    """
    await _ensure_stream(
        js,
        api.StreamConfig(
            name=s.cmd_stream,
            subjects=[s.cmd_all()],
            retention=api.RetentionPolicy.WORK_QUEUE,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=24 * 3600,
            num_replicas=replicas,
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
            num_replicas=replicas,
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
                out[b] = await js.create_key_value(
                    bucket=s.bucket(b), ttl=ttl, history=history, replicas=replicas
                )
            except BadRequestError:  # created concurrently by another process
                out[b] = await js.key_value(s.bucket(b))
        await _replicate(js, f"KV_{s.bucket(b)}", replicas)
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
    await _replicate(js, cfg.name, cfg.num_replicas or 1)


async def _replicate(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Set an existing stream's replica count to `replicas` when it differs."""
    info = await js.stream_info(stream)
    have = info.config.num_replicas or 1
    if have == replicas:
        return
    log.info("stream %s: %d replicas -> %d (SNAPSCALE_JS_REPLICAS)", stream, have, replicas)
    try:
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
    except BadRequestError as e:
        raise ConfigError(
            f"SNAPSCALE_JS_REPLICAS={replicas}: stream {stream} cannot be kept on {replicas} servers "
            f"({e.description}); a cluster needs at least that many JetStream servers"
        ) from None


async def through_elections(what: str, op: Callable[[], Awaitable[T]], budget_s: float = ELECTION_S) -> T:
    """`op()`, sent again while it fails as JetStream does when a stream has no leader (no answer,
    no responders, unavailable), for up to `budget_s`; then its error. Only for requests that are
    safe to repeat: a publish with a message id, a read, a compare-and-set."""
    deadline = time.monotonic() + budget_s
    delay = 0.2
    while True:
        try:
            return await op()
        except _TRANSIENT as e:
            if time.monotonic() + delay > deadline:
                raise
            log.info("%s: %s; again in %.1fs (a NATS cluster may be electing a leader)", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


async def publish(
    bus: Bus, subject: str, msg: object, *, msg_id: str | None = None, headers: dict[str, str] | None = None
) -> None:
    """Publish to JetStream with the current trace context; `msg_id` makes redelivery a no-op, and
    lets a publish that got no answer (a leader election) be sent again without a duplicate."""
    hdrs = telemetry.inject(dict(headers or {}))
    if msg_id:
        hdrs["Nats-Msg-Id"] = msg_id
    data = encode_message(msg)  # type: ignore[arg-type]

    async def once() -> None:
        await bus.js.publish(subject, data, headers=hdrs)

    if msg_id:
        await through_elections(f"publish {subject}", once)
    else:
        await once()


async def publish_core(bus: Bus, subject: str, msg: object) -> None:
    """Fire-and-forget on core NATS (heartbeats, traffic), with trace context."""
    await bus.nc.publish(subject, encode_message(msg), headers=telemetry.inject({}))  # type: ignore[arg-type]


async def kv_cas(kv: KeyValue, key: str, value: bytes, last_revision: int | None) -> int:
    """Compare-and-set: create when `last_revision` is None, else update only at that revision.

    Raises `RetryableError` when someone else wrote first; re-read and decide again.
    """

    async def once() -> int:
        if last_revision is None:
            return await kv.create(key, value)
        return await kv.update(key, value, last=last_revision)

    try:
        return await through_elections(f"kv {key}", once)
    except KeyWrongLastSequenceError as e:
        raise RetryableError(f"kv {key}: written concurrently ({e.description})", delay_s=0.0) from None
    except BadRequestError as e:
        # kv.create on an existing key answers "wrong last sequence" as a bad request in some servers
        raise RetryableError(f"kv {key}: {e.description}", delay_s=0.0) from None


async def kv_get(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    try:
        e = await through_elections(f"kv get {key}", lambda: kv.get(key))
    except KeyNotFoundError:
        return None
    if e.value is None:
        return None
    return e.value, e.revision or 0


# nats-py's keys() and history() read through a fresh ordered consumer and take "nothing pending
# and nothing delivered yet" as the end of the data. A message the server has already pushed but the
# client has not yet handed to the watcher's callback is then missed, and a key written just before
# reads as no keys at all (about one read in 300 on a quiet machine, more under load). An empty
# answer is checked against a read that uses no consumer, and read again.
KV_READ_TRIES = 3


async def kv_keys(kv: KeyValue) -> list[str]:
    """The keys the bucket holds a value under; [] for none (deleted keys are not listed)."""
    for _ in range(KV_READ_TRIES):
        try:
            return list(await kv.keys())
        except NoKeysError:
            pass
        if (await kv.status()).values == 0:
            return []
    return []


async def kv_history(kv: KeyValue, key: str) -> list[KeyValue.Entry]:
    """Every kept revision of `key`, deletes included, oldest first; [] if it never had one."""
    for _ in range(KV_READ_TRIES):
        try:
            return list(await kv.history(key))
        except NoKeysError:
            pass
        try:
            await kv.get(key)
        except KeyDeletedError:
            continue  # a delete is a revision: the history is not empty
        except KeyNotFoundError:
            return []
    return []


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


async def unsubscribe_all(watchers: list[KeyValue.KeyWatcher], subs: list[Any]) -> None:
    """Stop KV watchers and core subscriptions at shutdown; one that fails is already gone."""
    for w in watchers:
        with contextlib.suppress(Exception):
            await w.stop()  # type: ignore[no-untyped-call]
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
