"""`Client`: the operator's verbs over one NATS connection, for the CLI and for scripts.

Each method checks its input before it connects (a bad name is a `ConfigError`, nothing sent),
connects on first use with an operator's patience (`UnavailableError` within seconds), and leaves
the server as it found it when it only reads: streams and buckets are created only by a verb that
writes (deploy, freeze, prefetch). Long work reports through `on_progress`; nothing prints here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from nats.js.kv import KeyValue

from snapscale.freezer import operator
from snapscale.restorer import status as status_mod
from snapscale.scaler import traffic as traffic_mod
from snapscale.shared import bus
from snapscale.shared.bus import (
    Bucket,
    Bus,
    CheckpointEvent,
    DeploymentSpec,
    FreezeRefusal,
    HostHeartbeat,
    M,
    PrefetchCommand,
    ReplicaEvent,
    ReplicaState,
    Verb,
    check_token,
    decode_message,
    list_entries,
    load_spec,
    lookup_entry,
)
from snapscale.shared.core.errors import ConfigError, MessageError, NotFoundError
from snapscale.shared.core.settings import Settings
from snapscale.shared.core.units import format_duration

POLL_S = 0.5  # how often a wait reads KV again
GONE = (ReplicaState.STOPPED, ReplicaState.FAILED)


@dataclass(frozen=True)
class Progress:
    """Where long work stands: `done` of `total` (None: not known) in `unit` ("B", "events",
    "replicas", "s" for time alone), and what is being done."""

    what: str
    done: float
    total: float | None = None
    unit: str = ""


OnProgress = Callable[[Progress], None]


@dataclass(frozen=True)
class Deployed:
    name: str
    spec_hash: str
    revision: int  # KV revision of the stored spec
    change: Literal["new", "updated", "unchanged"]


@dataclass(frozen=True)
class Undeployed:
    name: str
    released: list[str]  # replicas it had, now gone
    left: list[ReplicaEvent] = field(default_factory=list)  # still held when the wait ended


@dataclass(frozen=True)
class Deployment:
    """A deployment in KV `deployments` with its replicas (KV `replicas`). `spec` is None when
    the stored value is unreadable; `problem` says why."""

    name: str
    spec: DeploymentSpec | None
    replicas: list[ReplicaEvent] = field(default_factory=list)
    problem: str = ""
    refusals: list[FreezeRefusal] = field(default_factory=list)  # keys it cannot be frozen on


@dataclass(frozen=True)
class Prefetched:
    deployment: str
    host: str
    checkpoint_id: str
    cached_bytes: int  # of the checkpoint's chunks in the host cache, last reported
    total_bytes: int | None  # what it needs (distinct non-zero chunks), when the catalog says
    done: bool  # fully in the host's cache
    sent: bool  # False: it was cached already, no command was sent


def _token(kind: str, value: str) -> str:
    try:
        return check_token(kind, value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class Client:
    """An operator's connection to one snapscale cluster. Connects on first use; `close()` (or
    leaving `async with`) disconnects. Not for concurrent use from several tasks at once."""

    def __init__(self, settings: Settings | None = None, *, name: str = "snapscale-client") -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.name = name
        self._bus: Bus | None = None
        self._topology = False  # streams and buckets ensured (a verb that writes ran)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._bus is not None:
            b, self._bus = self._bus, None
            await b.close()

    async def _reader(self) -> Bus:
        """The connection, with the buckets that exist (none is created)."""
        if self._bus is None:
            self._bus = await bus.open_bus(self.settings, self.name, create=False, operator=True)
        return self._bus

    async def _writer(self) -> Bus:
        """The connection, with every stream and bucket (created where missing)."""
        b = await self._reader()
        if not self._topology:
            b.kv = await bus.ensure_topology(b.js, b.subjects)
            self._topology = True
        return b

    # --- deployments ---------------------------------------------------------------------
    async def deploy(self, spec: DeploymentSpec | Path) -> Deployed:
        """Put a spec (or a TOML spec file, checked first) into KV `deployments`."""
        if isinstance(spec, Path):
            spec = load_spec(spec)
        b = await self._writer()
        kv = b.kv[Bucket.DEPLOYMENTS]
        data = spec.to_json()
        got = await bus.kv_get(kv, spec.name)
        if got is not None and got[0] == data:
            return Deployed(spec.name, spec.spec_hash(), got[1], "unchanged")
        revision = await kv.put(spec.name, data)
        return Deployed(spec.name, spec.spec_hash(), revision, "updated" if got else "new")

    async def undeploy(
        self,
        deployment: str,
        *,
        wait: bool = True,
        timeout_s: float = 120.0,
        on_progress: OnProgress | None = None,
    ) -> Undeployed:
        """Remove a deployment; the scaler stops its replicas (suspended ones too). With `wait`,
        return once KV `replicas` holds none of it, or after `timeout_s` with those `left`."""
        _token("deployment", deployment)
        b = await self._reader()
        specs = b.kv.get(Bucket.DEPLOYMENTS)
        if specs is None or await bus.kv_get(specs, deployment) is None:
            raise NotFoundError(f"deployment {deployment} is not deployed (see `snapscale deployments`)")
        before = await self._replicas_of(b, deployment)
        await specs.delete(deployment)
        names = [r.replica for r in before]
        if not wait:
            return Undeployed(deployment, [], before)
        deadline = time.monotonic() + timeout_s
        while True:
            left = await self._replicas_of(b, deployment)
            if on_progress is not None:
                what = f"undeploy {deployment}: releasing replicas"
                on_progress(Progress(what, len(before) - len(left), len(before), "replicas"))
            if not left or time.monotonic() >= deadline:
                gone = {r.replica for r in left}
                return Undeployed(deployment, [n for n in names if n not in gone], left)
            await asyncio.sleep(POLL_S)

    async def deployments(self) -> list[Deployment]:
        """Every deployment in KV, with its replicas, by name."""
        b = await self._reader()
        replicas = await _records(b.kv.get(Bucket.REPLICAS), ReplicaEvent)
        refused = await status_mod.refusals(b)
        out: list[Deployment] = []
        for name, data in await _values(b.kv.get(Bucket.DEPLOYMENTS)):
            mine = [r for r in replicas if r.deployment == name and r.state not in GONE]
            why = [r for r in refused if r.deployment == name]
            try:
                out.append(Deployment(name, DeploymentSpec.from_json(data), mine, refusals=why))
            except ConfigError as e:
                out.append(Deployment(name, None, mine, problem=str(e), refusals=why))
        return out

    async def status(self) -> status_mod.Status:
        """Hosts, replicas, checkpoints and host caches, as `snapscale status` shows them."""
        return await status_mod.gather(await self._reader())

    # --- replicas ------------------------------------------------------------------------
    async def wait_ready(
        self,
        deployment: str,
        *,
        replicas: int = 1,
        timeout_s: float = 300.0,
        on_progress: OnProgress | None = None,
    ) -> list[ReplicaEvent]:
        """Wait until `replicas` replicas of `deployment` are ready; their records, oldest first.
        Raises `TimeoutError` naming the states it saw."""
        _token("deployment", deployment)
        if replicas < 1:
            raise ConfigError(f"replicas must be at least 1, got {replicas}")
        b = await self._reader()
        specs = b.kv.get(Bucket.DEPLOYMENTS)
        if specs is None or await bus.kv_get(specs, deployment) is None:
            raise NotFoundError(f"deployment {deployment} is not deployed (see `snapscale deployments`)")
        deadline = time.monotonic() + timeout_s
        while True:
            mine = await self._replicas_of(b, deployment)
            ready = sorted((r for r in mine if r.state is ReplicaState.READY), key=lambda r: r.ts)
            if on_progress is not None:
                on_progress(Progress(f"waiting for {deployment}", len(ready), replicas, "replicas"))
            if len(ready) >= replicas:
                return ready
            if time.monotonic() >= deadline:
                seen = ", ".join(f"{r.replica}={r.state.value}" for r in mine) or "none"
                raise TimeoutError(
                    f"{len(ready)} of {replicas} replicas of {deployment} ready after "
                    f"{format_duration(timeout_s)} (replicas: {seen}; is traffic reaching the scaler?)"
                )
            await asyncio.sleep(POLL_S)

    async def freeze(
        self,
        deployment: str,
        *,
        replica: str | None = None,
        host: str | None = None,
        keep_running: bool = True,
        timeout_s: float = 900.0,
        on_progress: OnProgress | None = None,
    ) -> CheckpointEvent:
        """Freeze a ready replica now (the oldest, unless named) and wait for its checkpoint
        event; `ok` False says why it failed. Raises `TimeoutError` when no freezer answers."""
        _token("deployment", deployment)
        if replica is not None:
            _token("replica", replica)
        if host is not None:
            _token("host", host)
        b = await self._writer()
        what = [f"freeze {deployment}: finding a ready replica"]

        def sent(t: operator.Target) -> None:
            what[0] = f"freezing {deployment}/{t.replica} on {t.host}"

        async with _ticking(lambda: what[0], on_progress):
            return await operator.freeze(
                b, deployment, replica=replica, host=host, keep_running=keep_running,
                timeout_s=timeout_s, on_sent=sent,
            )  # fmt: skip

    # --- hosts ---------------------------------------------------------------------------
    async def prefetch(
        self,
        deployment: str,
        host: str,
        *,
        checkpoint_id: str | None = None,
        wait: bool = True,
        timeout_s: float = 600.0,
        on_progress: OnProgress | None = None,
    ) -> Prefetched:
        """Have `host` fetch a checkpoint of `deployment` into its cache (by default the one the
        catalog holds for the host's key), so its next scale-up restores from cache. With `wait`,
        return once the host reports it cached; `TimeoutError` after `timeout_s`."""
        _token("deployment", deployment)
        _token("host", host)
        if checkpoint_id is not None:
            _token("checkpoint", checkpoint_id)
        b = await self._writer()
        hb = await _heartbeat(b, host)
        ckpt, total = await _which_checkpoint(b, hb, deployment, checkpoint_id)
        if ckpt in hb.cached_checkpoints:
            return Prefetched(deployment, host, ckpt, hb.cached_bytes.get(ckpt, 0), total, True, False)
        cmd = PrefetchCommand(
            id=f"op-{uuid.uuid4().hex}", deployment=deployment, issued_at=time.time(), checkpoint_id=ckpt
        )
        await bus.publish(b, b.subjects.cmd(Verb.PREFETCH, host), cmd, msg_id=cmd.id)
        if not wait:
            return Prefetched(deployment, host, ckpt, hb.cached_bytes.get(ckpt, 0), total, False, True)
        deadline = time.monotonic() + timeout_s
        while True:
            have = hb.cached_bytes.get(ckpt, 0)
            if on_progress is not None:
                on_progress(Progress(f"prefetch {ckpt} to {host}", have, total, "B"))
            if ckpt in hb.cached_checkpoints:
                return Prefetched(deployment, host, ckpt, have, total, True, True)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{ckpt} not in {host}'s cache after {format_duration(timeout_s)} "
                    f"({have} bytes there); see the log of `snapscale restorer --host {host}`"
                )
            await asyncio.sleep(POLL_S)
            hb = await _heartbeat(b, host)

    # --- traffic -------------------------------------------------------------------------
    async def traffic(
        self,
        deployment: str,
        *,
        rps: float,
        concurrency: float,
        duration_s: float,
        events_per_s: float | None = None,
        on_progress: OnProgress | None = None,
    ) -> int:
        """Publish traffic events for `deployment` as a gateway would, for `duration_s`; returns
        how many went out. Each event roots its own trace (with telemetry set up)."""
        traffic_mod.check_traffic(
            deployment, rps=rps, concurrency=concurrency, duration_s=duration_s, events_per_s=events_per_s
        )

        def step(sent: int, total: int) -> None:
            if on_progress is not None:
                on_progress(Progress(f"traffic {deployment}", sent, total, "events"))

        return await traffic_mod.play(
            await self._reader(), deployment, rps=rps, concurrency=concurrency, duration_s=duration_s,
            events_per_s=events_per_s, on_event=step,
        )  # fmt: skip

    # --- helpers -------------------------------------------------------------------------
    async def _replicas_of(self, b: Bus, deployment: str) -> list[ReplicaEvent]:
        reps = await _records(b.kv.get(Bucket.REPLICAS), ReplicaEvent, prefix=f"{deployment}.")
        return [r for r in reps if r.state not in GONE]


async def _values(kv: KeyValue | None, prefix: str = "") -> list[tuple[str, bytes]]:
    """(key, value) of the bucket's keys under `prefix`, by key; a missing bucket holds none."""
    if kv is None:
        return []
    keys = sorted(k for k in await bus.kv_keys(kv) if k.startswith(prefix))
    got = await asyncio.gather(*(bus.kv_get(kv, k) for k in keys))
    return [(k, g[0]) for k, g in zip(keys, got, strict=True) if g is not None]


async def _records(kv: KeyValue | None, cls: type[M], prefix: str = "") -> list[M]:
    out: list[M] = []
    for _k, data in await _values(kv, prefix):
        with contextlib.suppress(MessageError):  # `snapscale status` lists unreadable entries
            out.append(decode_message(data, cls))
    return out


async def _heartbeat(b: Bus, host: str) -> HostHeartbeat:
    got = await bus.kv_get(b.kv[Bucket.HOSTS], host)
    if got is None:
        raise NotFoundError(f"host {host} is not reporting (no entry in KV hosts; see `snapscale status`)")
    try:
        return decode_message(got[0], HostHeartbeat)
    except MessageError as e:
        raise NotFoundError(f"host {host}: its KV hosts entry is unreadable ({e})") from None


async def _which_checkpoint(
    b: Bus, hb: HostHeartbeat, deployment: str, wanted: str | None
) -> tuple[str, int | None]:
    """The checkpoint to prefetch and the bytes it needs (when the catalog says)."""
    catalog = b.kv[Bucket.CHECKPOINTS]
    if wanted is not None:
        for e in await list_entries(catalog, deployment):
            if e.checkpoint_id == wanted:
                return wanted, e.sizes.get("unique")
        return wanted, None  # an older one, no longer in the catalog: the restorer looks it up
    key = hb.compat_hashes.get(deployment)
    if key is None:
        raise NotFoundError(
            f"host {hb.host} reports no key for {deployment} (is it deployed? a restorer learns "
            "new deployments at its next heartbeat)"
        )
    found = await lookup_entry(catalog, deployment, key)
    if found is None:
        raise NotFoundError(
            f"no checkpoint of {deployment} for {hb.host}'s key {key[:12]}: "
            f"freeze one first (`snapscale freeze {deployment}`)"
        )
    return found[0].checkpoint_id, found[0].sizes.get("unique")


@contextlib.asynccontextmanager
async def _ticking(what: Callable[[], str], on_progress: OnProgress | None) -> AsyncIterator[None]:
    """Report the time spent on work that says nothing until it is done (a freeze)."""
    if on_progress is None:
        yield
        return
    t0 = time.monotonic()

    async def tick() -> None:
        while True:
            on_progress(Progress(what(), time.monotonic() - t0, None, "s"))
            await asyncio.sleep(POLL_S)

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
