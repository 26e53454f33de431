"""The gateway service: the request path in front of the GPU hosts.

It follows KV `deployments` (which deployments exist, their request limits) and KV `replicas`
(which replicas are ready, at which endpoint) as the server pushes changes, never by polling: a
held request goes out the moment the restorer's ready record lands. It serves HTTP on its
address, and reports what it sees per deployment to the scaler (in flight + held, arrivals) at
least once a second, and at once when a request finds no ready replica. It listens only once
both buckets are loaded, so an open port means it knows the deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from opentelemetry import metrics, trace
from opentelemetry.trace import INVALID_SPAN

from snapscale.gateway.config import GatewayConfig
from snapscale.gateway.pool import COMING, Pool, Upstream, limits_of
from snapscale.gateway.proxy import Metrics, Proxy
from snapscale.gateway.upstream import Client
from snapscale.shared import bus
from snapscale.shared.bus import Bucket, Bus, DeploymentSpec, ReplicaEvent, ReplicaState, decode_message
from snapscale.shared.core import runtime
from snapscale.shared.core.errors import ConfigError, MessageError
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)
ACTIVATE_EVERY_S = 0.25  # immediate reports for one deployment at zero: at most this often
DRAIN_S = 10.0  # on stop, requests in flight get this long to finish
_S = ReplicaState
OUT_OF_SERVICE = frozenset({_S.RELEASING, _S.STOPPED, _S.SUSPENDED, _S.FAILED})


class Gateway:
    """One gateway. `run(stop)` until `stop` is set; `address` is where it listens once `ready`."""

    def __init__(
        self,
        settings: Settings,
        cfg: GatewayConfig,
        *,
        clock: Callable[[], float] = time.time,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.settings = settings
        self.meter = meter
        self.cfg = cfg
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        self.counters: Counter[str] = Counter()
        self.ready = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self._bus: Bus | None = None
        self.client = Client(cfg.connect_timeout_s)
        self._waking: dict[str, trace.Span] = {}  # deployment at zero -> the request that woke it

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "Gateway.run has not connected yet"
        return self._bus

    def pool(self, deployment: str) -> Pool:
        p = self.pools.get(deployment)
        if p is None:
            p = self.pools[deployment] = Pool(deployment)
        return p

    async def run(self, stop: asyncio.Event) -> None:
        self._bus = await bus.open_bus(self.settings, f"snapscale-gateway-{self.cfg.gateway_id}", stop=stop)
        watchers: list[KeyValue.KeyWatcher] = []
        tasks: list[asyncio.Task[None]] = []
        subs: list[Any] = []
        runner: web.ServerRunner | None = None
        try:
            for bucket, apply in ((Bucket.DEPLOYMENTS, self._on_spec), (Bucket.REPLICAS, self._on_record)):
                w = await self.bus.kv[bucket].watchall()
                watchers.append(w)
                await bus.kv_snapshot(w, apply)
                follow = bus.kv_follow(w, apply)
                tasks.append(runtime.guard(follow, f"gateway-{bucket.value}", on_crash=stop.set))
            sub, _ = await bus.subscribe_core(
                self.bus, self.bus.subjects.evt_replica_all(), ReplicaEvent, self._on_event
            )
            subs.append(sub)
            m = Metrics(self.meter)
            proxy = Proxy(self.cfg, self.pools, self.client, self._activate, m, self.counters)
            # a client that goes away cancels its handler: a held request leaves the queue, and the
            # replica's connection is closed, so it stops working for nobody
            server = web.Server(proxy.handle, access_log=None, handler_cancellation=True)
            runner = web.ServerRunner(server, shutdown_timeout=DRAIN_S)
            await runner.setup()
            site = web.TCPSite(runner, self.cfg.listen_host, self.cfg.listen_port, backlog=1024)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.address = (str(host), int(port))
            log.info(
                "gateway %s listens on %s:%d (%d deployments, %d ready replicas)",
                self.cfg.gateway_id,
                *self.address,
                sum(p.deployed for p in self.pools.values()),
                sum(len(p.replicas) for p in self.pools.values()),
            )
            self.ready.set()
            tasks.append(runtime.guard(self._report_loop(stop), "gateway-report", on_crash=stop.set))
            await stop.wait()
        finally:
            for pool in self.pools.values():
                pool.stop()  # held requests are answered (503) now; those in flight may finish
            if runner is not None:
                await runner.cleanup()  # stop accepting, let what is in flight finish (DRAIN_S)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.client.close()
            await self._close(watchers, subs)
            log.info("gateway %s stopped: %s", self.cfg.gateway_id, dict(self.counters))
        self.bus.raise_if_lost()  # exit non-zero: a supervisor restarts a gateway that went deaf

    async def _close(self, watchers: list[KeyValue.KeyWatcher], subs: list[Any]) -> None:
        await bus.unsubscribe_all(watchers, subs)
        with contextlib.suppress(Exception):
            await self._report()  # the last word: what is left in flight (zero, drained)
        nc = self.bus.nc
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=2)
            with contextlib.suppress(Exception):  # a nats-server stopped before us is no error of ours
                await nc.close()

    # --- traffic reports -----------------------------------------------------------------
    async def _report_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.report_s)

    async def _report(self) -> None:
        """Every deployment with requests since the last report (and once more at zero). While
        requests wait for a deployment's first replica, its reports carry the trace of the request
        that woke it: whichever report the scaler acts on (it may have learnt of the deployment
        only after the first), the scale-up continues that request's trace."""
        ts = self.clock()
        for pool in list(self.pools.values()):
            ev = pool.report(self.cfg.gateway_id, ts)
            if ev is not None:
                waking = self._waking.get(pool.deployment) if not pool.replicas else None
                try:
                    quiet = {"record_exception": False, "set_status_on_exception": False}
                    with trace.use_span(waking or INVALID_SPAN, **quiet):
                        await bus.publish_core(self.bus, self.bus.subjects.traffic(ev.deployment), ev)
                    self.counters["reports"] += 1
                except Exception as e:  # NATS away: the next report says it again, counted afresh
                    self.counters["reports.failed"] += 1
                    log.warning("traffic report for %s not sent: %s", ev.deployment, e)

    async def _activate(self, pool: Pool, span: trace.Span) -> None:
        """A request found no ready replica: report now, inside the request's span, so the
        scale-up the scaler starts continues this request's trace."""
        now = time.monotonic()
        if now - pool.activated_at < ACTIVATE_EVERY_S:
            return
        pool.activated_at = now
        self._waking.setdefault(pool.deployment, span)  # the first of the requests that wait
        ev = pool.report(self.cfg.gateway_id, self.clock())
        if ev is None:
            return
        self.counters["activations"] += 1
        try:
            with trace.use_span(span):
                await bus.publish_core(self.bus, self.bus.subjects.traffic(pool.deployment), ev)
        except Exception as e:  # NATS away: the request still waits; the next report says it again
            self.counters["reports.failed"] += 1
            log.warning("activation for %s not sent: %s", pool.deployment, e)

    # --- what KV and the replica events say -------------------------------------------------
    def _on_spec(self, key: str, value: bytes | None) -> None:
        if value is None:
            p = self.pools.get(key)
            if p is not None:
                log.info("deployment %s removed: held requests get a 404", key)
                p.undeploy()
            return
        try:
            spec = DeploymentSpec.from_json(value)
            limits = limits_of(spec)
        except ConfigError as e:
            self.counters["specs.refused"] += 1
            log.error("deployment %s: %s; its request limits stay as they were", key, e)
            return
        self.pool(spec.name).set_limits(limits)

    def _on_record(self, key: str, value: bytes | None) -> None:
        dep, _, replica = key.partition(".")
        if value is None:
            lost = self.pools[dep].lose(replica) if dep in self.pools else None
        else:
            try:
                ev = decode_message(value, ReplicaEvent)
            except MessageError as e:
                log.warning("KV replicas %s unreadable (%s); ignored", key, e)
                return
            pool = self.pool(ev.deployment)
            lost = pool.apply(ev, self.clock())
            if pool.replicas:
                self._waking.pop(pool.deployment, None)  # awake: the next wait is another story
        if lost is not None:
            self._call_off(lost, f"{dep}.{replica}")

    async def _on_event(self, ev: ReplicaEvent, msg: Msg) -> None:
        """Replica events carry the scale-up's trace context (KV records do not): kept per replica
        for the links of the requests it serves. A failure the scaler declares (a lost host, a
        replica not ready in time) is an event, then a deleted record: the event takes the replica
        out of service and gives held requests the reason."""
        pool = self.pools.get(ev.deployment)
        if pool is None:
            return
        if ev.state in COMING and msg.headers and "traceparent" in msg.headers:
            pool.trace.setdefault(ev.replica, dict(msg.headers))
        elif ev.state in OUT_OF_SERVICE:
            lost = pool.apply(ev, self.clock())
            if lost is not None:
                self._call_off(lost, f"{ev.deployment}.{ev.replica}")

    def _call_off(self, lost: Upstream, key: str) -> None:
        """The replica left mid-request: its unanswered idempotent tries go once more elsewhere."""
        if not any(u.endpoint == lost.endpoint for p in self.pools.values() for u in p.replicas.values()):
            self.client.forget(lost.endpoint)
        n = 0
        for a in list(lost.attempts):
            if not a.answered and a.retriable and not a.lost and a.task is not None:
                a.lost = True
                a.task.cancel()
                n += 1
        if n:
            self.counters["retried"] += n
            log.info("replica %s left: %d unanswered requests go to another replica", key, n)
