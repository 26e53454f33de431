"""The scaler service: follows traffic, hosts, replicas, specs and the catalog over NATS, and
while it holds the lease, ticks the policy and sends the commands placement chooses.

Every instance observes (so a standby's windows are warm); only the leader acts. Decisions
live in policy/placement; this module only wires I/O to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from snapscale.scaler import kvsync
from snapscale.scaler.actions import Actor
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.lease import Lease
from snapscale.scaler.policy import activation, decide, sample_problem
from snapscale.scaler.records import COMING, HOLDING, LIVE, TERMINAL, Tracked, apply_event
from snapscale.scaler.sources import TrafficSources
from snapscale.scaler.view import View
from snapscale.shared import bus
from snapscale.shared.bus import (
    MAX_CONCURRENCY,
    Bucket,
    Bus,
    CheckpointEvent,
    DeploymentSpec,
    HostHeartbeat,
    ReplicaEvent,
    ReplicaState,
    TrafficEvent,
    decode_entry,
    decode_message,
    replica_key,
)
from snapscale.shared.core import runtime
from snapscale.shared.core.errors import ConfigError, MessageError
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)
EVENTS_DURABLE = "scaler-replica-events"


class Scaler:
    """One scaler instance. `run(stop)` until `stop` is set; `leader` says whether it acts."""

    def __init__(
        self, settings: Settings, cfg: ScalerConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.cfg = cfg or ScalerConfig()
        self.clock = clock
        self.instance = f"{settings.host_id}-{uuid.uuid4().hex[:6]}"
        self.view = View()
        self.counters: Counter[str] = Counter()
        self.leader = False
        self.ready = asyncio.Event()  # set once the first snapshot of KV is loaded
        self._bus: Bus | None = None
        self._actor: Actor | None = None
        self._lease: Lease | None = None
        self._events_stop: asyncio.Event | None = None
        self._events_task: asyncio.Task[None] | None = None
        self._traffic_counts: dict[str, int] = {}
        self.traffic_sources = TrafficSources()
        self._rebuilding: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[list[str]]] = set()

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "Scaler.run has not connected yet"
        return self._bus

    @property
    def actor(self) -> Actor:
        assert self._actor is not None
        return self._actor

    def acting(self) -> bool:
        """Leading, with a lease still provably ours: only then are commands sent."""
        return self.leader and self._lease is not None and self._lease.valid()

    def stats(self) -> dict[str, int]:
        return {**self.counters, **{f"traffic.{k}": v for k, v in self._traffic_counts.items()}}

    # --- the main loop -----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._bus = await bus.open_bus(self.settings, f"snapscale-scaler-{self.instance}", stop=stop)
        self._actor = Actor(self._bus, self.view, self.cfg, self.counters)
        self._lease = Lease(self.bus.kv[Bucket.LEASES], self.instance, self.cfg.lease_s)
        tasks: list[asyncio.Task[None]] = []
        watchers: list[KeyValue.KeyWatcher] = []
        subs: list[Any] = []
        try:
            now = self.clock()
            await self._load_hosts(now)
            for bucket, keys, apply in (
                (Bucket.DEPLOYMENTS, ">", self._on_spec),
                (Bucket.CHECKPOINTS, ">", self._on_catalog),
                (Bucket.LEASES, bus.refusal_key("*", "*"), self._on_refusal),
            ):
                w = await self.bus.kv[bucket].watch(keys)
                await bus.kv_snapshot(w, apply)
                tasks.append(
                    runtime.guard(bus.kv_follow(w, apply), f"scaler-{bucket.value}", on_crash=stop.set)
                )
            sub, self._traffic_counts = await bus.subscribe_core(
                self.bus, self.bus.subjects.traffic_all(), TrafficEvent, self._on_traffic
            )
            subs.append(sub)
            sub, _ = await bus.subscribe_core(
                self.bus, self.bus.subjects.evt_host_all(), HostHeartbeat, self._on_heartbeat
            )
            subs.append(sub)
            sub = await self.bus.js.subscribe(
                self.bus.subjects.evt_checkpoint_all(),
                cb=self._on_checkpoint,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.NEW,
            )
            subs.append(sub)
            await self._ensure_events_consumer()
            self.ready.set()
            tasks.append(runtime.guard(self._lease_loop(stop), "scaler-lease", on_crash=stop.set))
            tasks.append(runtime.guard(self._tick_loop(stop), "scaler-tick", on_crash=stop.set))
            await stop.wait()
        finally:
            self.leader = False
            if self._rebuilding is not None:
                self._rebuilding.cancel()
            if self._sending:  # commands already counted in KV go out before we close
                await asyncio.wait(self._sending, timeout=5.0)
            await self._stop_events()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    await self._lease.release()
            await self._close(watchers, subs)
            log.info("scaler %s stopped: %s", self.instance, dict(self.stats()))
        self.bus.raise_if_lost()  # exit non-zero: a supervisor restarts a scaler that went deaf

    async def _close(self, watchers: list[KeyValue.KeyWatcher], subs: list[Any]) -> None:
        """Flush what was published, then close: every handler has stopped already, and a drain
        would wait on the events consumer's pull subscription, which `bus.consume` keeps."""
        await bus.unsubscribe_all(watchers, subs)
        nc = self.bus.nc
        if not nc.is_closed:
            try:
                await nc.flush(timeout=2)
            except Exception as e:
                log.warning("scaler %s: flush on stop failed (%s)", self.instance, e)
            await nc.close()

    async def _lease_loop(self, stop: asyncio.Event) -> None:
        assert self._lease is not None
        while not stop.is_set():
            valid = await self._lease.step()
            if valid and not self.leader and self._rebuilding is None:
                # rebuilt on its own task: the lease must keep being renewed while KV is read
                self._rebuilding = runtime.guard(self._become_leader(), "scaler-rebuild")
                self._rebuilding.add_done_callback(lambda _t: setattr(self, "_rebuilding", None))
            elif not valid and self.leader:
                self.leader = False
                await self._stop_events()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.lease_s / 3)

    async def _tick_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            if self.acting():
                await self.tick(self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, self.cfg.tick_s - (time.monotonic() - t0)))

    # --- leadership --------------------------------------------------------------------------
    async def _become_leader(self) -> None:
        """Rebuild replicas from KV, send again what a past leader may have left unsent, then
        follow replica events (the durable consumer holds what happened in between)."""
        now = self.clock()
        records = await kvsync.values(self.bus.kv[Bucket.REPLICAS])
        for key in list(self.view.replicas):
            self.view.drop(key)
        for key, data, rev in records:
            try:
                ev = decode_message(data, ReplicaEvent)
            except MessageError as e:
                log.warning("KV replicas %s unreadable (%s); ignored", key, e)
                continue
            if ev.state not in TERMINAL:
                self.view.track(Tracked(ev, rev, now))
        for dep in {t.ev.deployment for t in self.view.replicas.values()} - set(self.view.specs):
            log.info("deployment %s: replicas in KV and no spec (removed meanwhile): stopping them", dep)
            self.view.retire(dep, now)
        if self._lease is None or not self._lease.valid():
            log.warning("scaler %s: lease lapsed while rebuilding; not leading", self.instance)
            return
        self.leader = True
        pending = [t for t in self.view.replicas.values() if t.ev.state is ReplicaState.PENDING]
        for t in pending:
            if t.ev.deployment in self.view.specs:
                await self.actor.resend(t, now)
        # KV may still hold replicas of a restorer that restarted while no scaler was leading
        await self._lost([t for hb in list(self.view.hosts.values()) for t in self.view.gone_from(hb)], now)
        log.info(
            "scaler %s leads with %d replicas (%d re-sent)",
            self.instance,
            len(self.view.replicas),
            len(pending),
        )
        self._events_stop = asyncio.Event()
        self._events_task = runtime.guard(
            bus.consume(
                self.bus, self.bus.subjects.evt_replica_all(), EVENTS_DURABLE, ReplicaEvent, self._on_replica,
                stop=self._events_stop,
            ),
            "scaler-replica-events",
        )  # fmt: skip

    async def _stop_events(self) -> None:
        if self._events_stop is not None:
            self._events_stop.set()
        if self._events_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._events_task, 2.0)
        self._events_stop = self._events_task = None

    async def _ensure_events_consumer(self) -> None:
        """The shared durable starts at new events: history before the first scaler is in KV."""
        try:
            await self.bus.js.consumer_info(self.bus.subjects.evt_stream, EVENTS_DURABLE)
        except NotFoundError:
            await self.bus.js.add_consumer(
                self.bus.subjects.evt_stream,
                api.ConsumerConfig(
                    durable_name=EVENTS_DURABLE,
                    filter_subject=self.bus.subjects.evt_replica_all(),
                    deliver_policy=api.DeliverPolicy.NEW,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_deliver=5,
                ),
            )

    # --- the tick ------------------------------------------------------------------------------
    async def tick(self, now: float) -> None:
        """Expire hosts and late replicas, then decide every deployment once."""
        await self._expire(now)
        for dep in list(self.view.specs):
            if not self.acting():
                return  # the lease lapsed mid-tick: a standby may be acting already
            try:
                await self.reconcile(dep, now)
            except Exception:  # one deployment's trouble (NATS hiccup) must not stop the others
                self.counters["errors"] += 1
                log.exception("deployment %s: decision not carried out; next tick tries again", dep)

    async def reconcile(self, dep: str, now: float) -> None:
        spec_ = self.view.specs.get(dep)
        if spec_ is None:
            return
        if dep in self.view.retired:
            await self.actor.stop_suspended(dep, now)
        current = self.view.live_count(dep)
        d = decide(self.view.window(dep, now), spec_.scaling, current, now)
        self.counters["decisions"] += 1
        if d.desired > current:
            await self.actor.scale_up(dep, d.desired - current, now, d)
        elif d.desired < current:
            await self.actor.scale_down(dep, current - d.desired, now, d)

    async def _expire(self, now: float) -> None:
        v = self.view
        for host, seen in list(v.host_seen.items()):
            hb = v.hosts[host]
            if now - seen > max(3 * hb.interval_s, self.cfg.host_timeout_floor_s):
                log.warning("host %s: no heartbeat for %.1fs; its replicas are lost", host, now - seen)
                del v.hosts[host], v.host_seen[host]
                for t in [t for t in v.replicas.values() if t.ev.host == host]:
                    if t.ev.state in LIVE or t.ev.state is ReplicaState.RELEASING:
                        await self.actor.fail(t, now, f"host {host} stopped reporting", cleanup=False)
                    else:
                        v.drop(t.key)
        for t in v.coming():
            s = v.specs.get(t.ev.deployment)
            limit = s.scaling.ready_timeout_s if s else 300.0
            if now - t.placed_at > limit:
                await self.actor.fail(t, now, f"not ready within {limit:.0f}s", cleanup=True)
        for dep, fz in list(v.freezing.items()):
            if not fz.done and now >= fz.deadline:
                log.warning("deployment %s: freeze %s not done in time; releasing anyway", dep, fz.command_id)
                fz.done = True
        for k in [k for k, until in v.avoid.items() if until <= now]:
            del v.avoid[k]
        for t in [t for t in v.replicas.values() if t.ev.state is ReplicaState.RELEASING]:
            if now - t.ev.ts > self.cfg.release_timeout_s:
                log.warning("replica %s: no answer to its release for %.0fs; forgotten", t.key, now - t.ev.ts)
                v.drop(t.key)
        for dep in [d for d in v.retired if not any(t.ev.state in HOLDING for t in v.of(d))]:
            log.info("deployment %s: removed and drained", dep)
            v.forget(dep)

    # --- inputs --------------------------------------------------------------------------------
    async def _on_traffic(self, ev: TrafficEvent, msg: Msg) -> None:
        if ev.deployment not in self.view.specs:
            self._traffic_counts["unknown"] = self._traffic_counts.get("unknown", 0) + 1
            return
        now = self.clock()
        if sample_problem(ev.concurrency, ev.arrivals) is None:
            # several gateways: each reports its own share, so the deployment's load is their sum
            total = self.traffic_sources.observe(ev.deployment, ev.source, ev.concurrency, now)
            ev = replace(ev, concurrency=min(total, MAX_CONCURRENCY))
        w = self.view.window(ev.deployment, now)
        if not w.record(now, ev.concurrency, ev.arrivals):
            self._traffic_counts["refused"] = self._traffic_counts.get("refused", 0) + 1
            why = sample_problem(ev.concurrency, ev.arrivals)
            log.warning("traffic for %s refused: %s", ev.deployment, why)
            return
        if msg.headers:
            self.view.traffic_headers[ev.deployment] = msg.headers
        if not self.acting():
            return
        current = self.view.live_count(ev.deployment)
        n = activation(w, self.view.specs[ev.deployment].scaling, current, ev.concurrency, ev.arrivals, now)
        if n:
            self.counters["activations"] += 1
            up = self.actor.plan_up(ev.deployment, n, now, None, activation=True)
            if up is not None:
                # sent on its own task: this subscription's next events need not wait for its I/O
                task = asyncio.create_task(self.actor.send_up(up))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _on_heartbeat(self, hb: HostHeartbeat, _msg: Msg) -> None:
        if hb.host not in self.view.hosts:
            log.info("host %s reports (%d GPUs, %d cpu slots)", hb.host, len(hb.gpus), hb.cpu_slots)
        now = self.clock()
        lost = self.view.heartbeat(hb, now)
        if lost and self.acting():
            # its restorer restarted without them: replaced now, not after a ready or host timeout
            await self._lost(lost, now)
            for dep in sorted({t.ev.deployment for t in lost} - self.actor.starved):
                if dep in self.view.specs:
                    await self.reconcile(dep, now)
        if self.acting() and self.actor.starved and _has_room(hb):
            # A host just freed room (a release finished): place what found none now, rather than
            # at the next traffic event or tick. Without this a scale-up right after a scale to
            # zero waited for the next decision (0.5 s on the GPU bench).
            for dep in list(self.actor.starved):
                if dep in self.view.specs:
                    await self.reconcile(dep, now)
                else:
                    self.actor.starved.discard(dep)

    async def _lost(self, lost: list[Tracked], now: float) -> None:
        """Fail replicas gone with a restart of their restorer; the host is not to blame."""
        for t in lost:
            reason = f"lost with a restart of the restorer on {t.ev.host}"
            await self.actor.fail(t, now, reason, cleanup=False, avoid=False)

    async def _on_replica(self, ev: ReplicaEvent, _msg: Msg) -> None:
        key = replica_key(ev.deployment, ev.replica)
        t = self.view.replicas.get(key)
        if ev.state in TERMINAL:
            if t is not None:
                failed_here = ev.state is ReplicaState.FAILED and t.ev.state in COMING
                if failed_here and not self.view.cut_by_restart(t, ev):
                    self.view.avoid[(ev.deployment, ev.host)] = self.clock() + self.cfg.avoid_s
                self.view.drop(key)
            return
        new = apply_event(t.ev if t else None, ev)
        if new is None:
            return
        if t is None:
            self.view.track(Tracked(new, None, self.clock()))
        else:
            t.ev = new
        if new.state is ReplicaState.READY:
            self.view.unhold(key)  # up and reporting: the host's heartbeat flags cover its GPUs

    async def _on_checkpoint(self, msg: Msg) -> None:
        try:
            ev = decode_message(msg.data, CheckpointEvent)
        except MessageError as e:
            log.warning("dropped malformed checkpoint event: %s", e)
            return
        fz = self.view.freezing.get(ev.deployment)
        if fz is not None and ev.command_id == fz.command_id:
            fz.done = True
            log.info(
                "deployment %s: freeze %s %s", ev.deployment, fz.command_id, "done" if ev.ok else ev.reason
            )
        if ev.ok and ev.checkpoint_id and ev.compat_hash:
            self.view.catalog.setdefault(ev.deployment, {})[ev.compat_hash] = ev.checkpoint_id
        if self.acting() and ev.compat_hash:
            await self._record_refusal(ev)

    async def _record_refusal(self, ev: CheckpointEvent) -> None:
        """A refused freeze is kept per deployment and key (the freezer skips auto-freezes of it,
        operators see it); a checkpoint made for the key clears it. KV first, the watch follows."""
        prev = self.view.refused.get(ev.deployment, {}).get(ev.compat_hash)
        new = bus.next_refusal(prev, ev)
        if new == prev:
            return
        try:
            await bus.store_refusal(self.bus.kv[Bucket.LEASES], ev.deployment, ev.compat_hash, new)
        except Exception as e:  # the next failure of the key records it again
            log.warning("deployment %s: freeze refusal not recorded: %s", ev.deployment, e)
            return
        self.view.set_refusal(ev.deployment, ev.compat_hash, new)
        if new is not None and prev is None:
            log.warning(
                "deployment %s cannot be frozen on key %s: %s", ev.deployment, ev.compat_hash, new.refusal
            )

    def _on_refusal(self, key: str, value: bytes | None) -> None:
        _prefix, dep, compat_hash = [*key.split(".", 2), "", ""][:3]
        if value is None:
            self.view.set_refusal(dep, compat_hash, None)
            return
        for r in bus.read_refusals([(key, value)]):
            self.view.set_refusal(r.deployment, r.compat_hash, r)

    def _on_spec(self, key: str, value: bytes | None) -> None:
        if value is None:
            log.info("deployment %s removed from KV: releasing its replicas", key)
            self.view.retire(key, self.clock())
            return
        try:
            s = DeploymentSpec.from_json(value)
        except ConfigError as e:
            log.error("deployment %s: bad spec in KV (%s); ignored", key, e)
            return
        self.view.put_spec(s, self.clock())

    def _on_catalog(self, key: str, value: bytes | None) -> None:
        dep, _, compat_hash = key.partition(".")
        if value is None:
            self.view.catalog.get(dep, {}).pop(compat_hash, None)
            return
        try:
            e = decode_entry(value)
        except MessageError as err:
            log.warning("catalog %s unreadable (%s); ignored", key, err)
            return
        self.view.catalog.setdefault(e.deployment, {})[e.compat_hash] = e.checkpoint_id

    async def _load_hosts(self, now: float) -> None:
        for key, data, _rev in await kvsync.values(self.bus.kv[Bucket.HOSTS]):
            try:
                self.view.heartbeat(decode_message(data, HostHeartbeat), now)
            except MessageError as e:
                log.warning("KV hosts %s unreadable (%s); ignored", key, e)


def _has_room(hb: HostHeartbeat) -> bool:
    return hb.cpu_slots > 0 or any(g.free for g in hb.gpus)
