"""Turning decisions into commands: place or release replicas, freeze before the last goes,
prefetch after it went, fail replicas that timed out or lost their host.

The view is updated before the first await of each action, so a concurrent decision sees what
this one sent; the I/O follows (KV record and command, the command's id as its Nats-Msg-Id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, replace

from opentelemetry import trace
from opentelemetry.trace import Link

from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.placement import Placement, choose_releases, needs_freeze, place, prefetch_targets
from snapscale.scaler.policy import ScaleDecision
from snapscale.scaler.records import Tracked
from snapscale.scaler.view import Freezing, View
from snapscale.shared import bus
from snapscale.shared.bus import (
    Bucket,
    Bus,
    FreezeCommand,
    PrefetchCommand,
    ReleaseCommand,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
    ScaleUpCommand,
    Verb,
    encode_message,
    replica_key,
)
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import RetryableError

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)



WARN_EVERY_S = 30.0


@dataclass
class UpBatch:
    """Restore commands planned (and already counted in the view), not yet sent."""

    batch: list[tuple[ScaleUpCommand, ReplicaEvent, Tracked | None]]
    span: trace.Span


def new_id() -> str:
    return uuid.uuid4().hex


class Actor:
    """Sends the commands a decision implies and records them in the view and KV `replicas`."""

    def __init__(self, b: Bus, view: View, cfg: ScalerConfig, counters: Counter[str]) -> None:
        self.bus = b
        self.view = view
        self.cfg = cfg
        self.counters = counters
        self._warned: dict[str, float] = {}
        # deployments whose last scale-up found no room: a heartbeat reporting room retries them
        self.starved: set[str] = set()

    # --- spans -------------------------------------------------------------------------
    def _span(
        self, dep: str, what: str, d: ScaleDecision | None, current: int, child_of_traffic: bool
    ) -> trace.Span:
        headers = self.view.traffic_headers.get(dep)
        ctx = telemetry.extract(headers) if headers else None
        parent = ctx if child_of_traffic else None
        links = []
        if ctx is not None and not child_of_traffic:
            sc = trace.get_current_span(ctx).get_span_context()
            if sc.is_valid:
                links.append(Link(sc))
        attrs: dict[str, str | int | float | bool] = {
            "snapscale.deployment": dep,
            "snapscale.scale.what": what,
            "snapscale.scale.current": current,
        }
        if d is not None:
            attrs.update(
                {
                    "snapscale.scale.desired": d.desired,
                    "snapscale.scale.panic": d.panic,
                    "snapscale.scale.stable_avg": d.stable_avg,
                    "snapscale.scale.panic_avg": d.panic_avg,
                    "snapscale.scale.reason": d.reason,
                }
            )
        return tracer.start_span("scaler.decision", context=parent, links=links, attributes=attrs)

    # --- scale up ------------------------------------------------------------------------
    async def scale_up(
        self, dep: str, n: int, now: float, d: ScaleDecision | None, *, activation: bool = False
    ) -> list[str]:
        """Place and start `n` replicas; returns the replica ids whose commands went out."""
        up = self.plan_up(dep, n, now, d, activation=activation)
        return await self.send_up(up) if up is not None else []

    def plan_up(
        self, dep: str, n: int, now: float, d: ScaleDecision | None, *, activation: bool = False
    ) -> UpBatch | None:
        """The synchronous half of a scale-up: place, and record in the view what will be sent.

        The caller may send it later (`send_up`): a concurrent decision already counts it.
        """
        spec = self.view.specs[dep]
        current = self.view.live_count(dep)
        placements = place(
            spec,
            n,
            self.view.hosts,
            self.view.catalog.get(dep, {}),
            self.view.replicas_on(dep),
            self.view.reserved,
            self.view.avoided(dep, now),
        )
        if len(placements) < n:
            self.starved.add(dep)
            self.counters["unplaceable"] += n - len(placements)
            if now - self._warned.get(dep, -1e18) >= WARN_EVERY_S:
                self._warned[dep] = now
                log.warning("deployment %s: no room for %d of %d new replicas", dep, n - len(placements), n)
        else:
            self.starved.discard(dep)
        if not placements:
            return None
        self.view.freezing.pop(dep, None)  # coming back up: a pending going-to-zero is moot
        batch = [self._start(dep, p, now) for p in placements]
        span = self._span(dep, "activate" if activation else "scale-up", d, current, activation)
        span.set_attribute("snapscale.scale.placed", len(batch))
        return UpBatch(batch, span)

    async def send_up(self, up: UpBatch) -> list[str]:
        with trace.use_span(up.span, end_on_exit=True):
            results = await asyncio.gather(*(self._send_scale_up(c, ev, old) for c, ev, old in up.batch))
        return [c.replica for (c, _ev, _old), ok in zip(up.batch, results, strict=True) if ok]

    def _start(
        self, dep: str, p: Placement, now: float
    ) -> tuple[ScaleUpCommand, ReplicaEvent, Tracked | None]:
        replica = p.resume or f"{dep}-{uuid.uuid4().hex[:10]}"
        key = replica_key(dep, replica)
        cmd = ScaleUpCommand(
            id=new_id(),
            deployment=dep,
            replica=replica,
            issued_at=now,
            deadline_s=self.view.specs[dep].scaling.ready_timeout_s,
            gpu_uuids=list(p.gpu_uuids),
        )
        ev = ReplicaEvent(
            deployment=dep,
            replica=replica,
            host=p.host,
            state=ReplicaState.RESUMING if p.resume else ReplicaState.PENDING,
            ts=now,
            command_id=cmd.id,
            reason=f"placed by the scaler: {p.why}",
            checkpoint_id=p.checkpoint_id,
            gpu_uuids=list(p.gpu_uuids),
        )
        old = self.view.replicas.get(key)
        self.view.track(Tracked(ev, None, now))
        self.view.reserved.take(p)
        self.view.hold(key, p.host, p.gpu_uuids)
        return cmd, ev, old

    async def _send_scale_up(self, cmd: ScaleUpCommand, ev: ReplicaEvent, old: Tracked | None) -> bool:
        """The command and the KV record go out together: the command is what the latency is
        measured by, and neither order loses a replica (the view already counts it; a new leader
        finds it in KV, written by us or by the restorer, whose record wins a race)."""
        key = replica_key(ev.deployment, ev.replica)
        subject = self.bus.subjects.cmd(Verb.SCALE_UP, ev.host)
        wrote, sent = await asyncio.gather(
            self._write(key, ev, create=old is None),
            bus.publish(self.bus, subject, cmd, msg_id=cmd.id),
            return_exceptions=True,
        )
        if isinstance(sent, BaseException):
            log.error("replica %s: restore command not sent (%s); forgetting it", key, sent)
            self.view.drop(key)
            if old is not None:
                self.view.track(old)
            if not isinstance(wrote, BaseException):
                with contextlib.suppress(Exception):
                    await self.bus.kv[Bucket.REPLICAS].delete(key)
            return False
        if isinstance(wrote, BaseException):
            log.warning("replica %s: KV record not written (%s); the restorer's will do", key, wrote)
        self.counters["cmd.restore"] += 1
        log.info("replica %s -> host %s (%s)", key, ev.host, ev.reason, extra={"deployment": ev.deployment})
        return True

    async def resend(self, t: Tracked, now: float) -> None:
        """A new leader sends again what an old one may not have: same id, so it is done once."""
        cmd = ScaleUpCommand(
            id=t.ev.command_id or new_id(),
            deployment=t.ev.deployment,
            replica=t.ev.replica,
            issued_at=now,
            deadline_s=self.view.specs[t.ev.deployment].scaling.ready_timeout_s,
            gpu_uuids=list(t.ev.gpu_uuids),
        )
        await bus.publish(self.bus, self.bus.subjects.cmd(Verb.SCALE_UP, t.ev.host), cmd, msg_id=cmd.id)

    async def _write(self, key: str, ev: ReplicaEvent, *, create: bool) -> None:
        """The replica's KV record, compare-and-set; a concurrent writer (its restorer) wins."""
        kv = self.bus.kv[Bucket.REPLICAS]
        try:
            if create:
                await bus.kv_cas(kv, key, encode_message(ev), None)
                return
            got = await bus.kv_get(kv, key)
            await bus.kv_cas(kv, key, encode_message(ev), got[1] if got else None)
        except RetryableError as e:
            log.info("replica %s: KV moved on meanwhile (%s); the restorer's word stands", key, e)

    # --- scale down ------------------------------------------------------------------------
    async def scale_down(self, dep: str, n: int, now: float, d: ScaleDecision | None) -> None:
        spec = self.view.specs[dep]
        catalog = self.view.catalog.get(dep, {})
        ready = self.view.ready(dep)
        live = self.view.live_count(dep)
        releases = choose_releases(spec, min(n, len(ready)), ready, self.view.hosts, self.view.reserved)
        if not releases:
            return
        to_zero = live - len(releases) == 0
        freeze: FreezeCommand | None = None
        retired = dep in self.view.retired
        if to_zero and not retired:
            last = releases[-1]
            fz = self.view.freezing.get(dep)
            host = self.view.hosts.get(last.host)
            if fz is None and needs_freeze(host, dep, catalog):
                freeze = FreezeCommand(id=new_id(), deployment=dep, replica=last.replica, issued_at=now)
                self.view.freezing[dep] = Freezing(freeze.id, last.host, now + self.cfg.freeze_timeout_s)
                releases = releases[:-1]
            elif fz is not None and not fz.done and now < fz.deadline and needs_freeze(host, dep, catalog):
                releases = releases[:-1]  # still freezing: the last one waits
            to_zero = live - len(releases) == 0
        cmds: list[tuple[ReleaseCommand, ReplicaEvent]] = []  # with the state to go back to
        for r in releases:
            key = replica_key(dep, r.replica)
            t = self.view.replicas[key]
            c = ReleaseCommand(id=new_id(), deployment=dep, replica=r.replica, issued_at=now, mode=r.mode)
            cmds.append((c, t.ev))
            t.ev = replace(
                t.ev, state=ReplicaState.RELEASING, ts=now, reason=f"released: {r.why}", command_id=c.id
            )
        span = self._span(dep, "scale-down", d, live, False)
        with trace.use_span(span, end_on_exit=True):
            if freeze is not None:
                span.set_attribute("snapscale.scale.freeze", freeze.replica)
                await bus.publish(
                    self.bus,
                    self.bus.subjects.cmd(Verb.FREEZE, self.view.freezing[dep].host),
                    freeze,
                    msg_id=freeze.id,
                )
                self.counters["cmd.freeze"] += 1
                log.info("deployment %s: freezing %s before its last replica goes", dep, freeze.replica)
            sent = 0
            for c, before in cmds:
                sent += await self._send_release(self.view.replicas[replica_key(dep, c.replica)], c, before)
            if to_zero and sent == len(cmds) and cmds and not retired:
                self.view.freezing.pop(dep, None)
                await self.prefetch(dep, now)

    async def _send_release(self, t: Tracked, c: ReleaseCommand, before: ReplicaEvent) -> bool:
        """Send a release already recorded in the view (`t.ev` releasing); undone if it fails."""
        try:
            # KV first: written after the command, it could land after the restorer's
            # `stopped` (and its delete) and bring back a record of a gone replica
            await self._write(t.key, t.ev, create=False)
            await bus.publish(self.bus, self.bus.subjects.cmd(Verb.RELEASE, t.ev.host), c, msg_id=c.id)
        except Exception as e:
            log.error("replica %s: release not sent (%s); it stays %s", t.key, e, before.state.value)
            t.ev = before
            return False
        self.counters["cmd.release"] += 1
        log.info("replica %s released (%s, %s)", t.key, c.mode.value, t.ev.reason)
        return True

    async def stop_suspended(self, dep: str, now: float) -> None:
        """A removed deployment's suspended replicas still hold host RAM (and GPU state in it):
        stop them. Scale-down releases only ready replicas, so these need their own command."""
        for t in self.view.suspended(dep):
            c = ReleaseCommand(
                id=new_id(), deployment=dep, replica=t.ev.replica, issued_at=now, mode=ReleaseMode.STOP
            )
            before = t.ev
            t.ev = replace(
                t.ev, state=ReplicaState.RELEASING, ts=now, reason="deployment removed", command_id=c.id
            )
            await self._send_release(t, c, before)

    async def prefetch(self, dep: str, now: float) -> None:
        spec = self.view.specs[dep]
        targets = prefetch_targets(
            spec, self.view.hosts, self.view.catalog.get(dep, {}), self.view.reserved, self.cfg.prefetch_hosts
        )
        for host, ckpt in targets:
            c = PrefetchCommand(id=new_id(), deployment=dep, issued_at=now, checkpoint_id=ckpt)
            await bus.publish(self.bus, self.bus.subjects.cmd(Verb.PREFETCH, host), c, msg_id=c.id)
            self.counters["cmd.prefetch"] += 1
            log.info("deployment %s at zero: host %s prefetches %s", dep, host, ckpt)

    # --- failures ----------------------------------------------------------------------------
    async def fail(self, t: Tracked, now: float, reason: str, *, cleanup: bool, avoid: bool = True) -> None:
        """Forget a replica that will not serve; its slot is placed again on the next decision.
        With `avoid`, its host is skipped for the deployment for a while (not when the host is
        not to blame, e.g. its restorer restarted)."""
        self.view.drop(t.key)
        if avoid:
            self.view.avoid[(t.ev.deployment, t.ev.host)] = now + self.cfg.avoid_s
        self.counters["failed"] += 1
        log.warning("replica %s on %s failed: %s", t.key, t.ev.host, reason)
        ev = replace(t.ev, state=ReplicaState.FAILED, ts=now, reason=reason)
        try:
            await bus.publish(
                self.bus,
                self.bus.subjects.evt_replica(t.ev.deployment),
                ev,
                msg_id=f"scaler.{t.key}.failed.{t.ev.command_id}",
            )
            await self.bus.kv[Bucket.REPLICAS].delete(t.key)
            if cleanup:
                c = ReleaseCommand(
                    id=new_id(), deployment=t.ev.deployment, replica=t.ev.replica, issued_at=now
                )
                await bus.publish(self.bus, self.bus.subjects.cmd(Verb.RELEASE, t.ev.host), c, msg_id=c.id)
        except Exception as e:
            log.warning("replica %s: failure not fully recorded (%s)", t.key, e)
