"""The restorer service: one per host. Consumes restore, release and prefetch commands, runs
scale-ups in parallel up to the free slots, publishes the host's inventory, re-adopts on restart.

Every command is acked only once its outcome is in the ledger and on the bus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from nats.aio.msg import Msg
from opentelemetry import trace

from snapscale.restorer import deaths, events, inventory, metrics
from snapscale.restorer.checkpoints import Checkpoints
from snapscale.restorer.cleanup import reap
from snapscale.restorer.compat import CompatKeys, deployment_keys
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.errors import describe
from snapscale.restorer.forwarding import Forwards
from snapscale.restorer.host import Host, HostTools
from snapscale.restorer.hot import HotImages
from snapscale.restorer.ledger import Entry, Ledger
from snapscale.restorer.lookup import find_checkpoint
from snapscale.restorer.refused import refused_scale_up
from snapscale.restorer.release import release
from snapscale.restorer.replicas import Replicas
from snapscale.restorer.restart import adopt, prune_run_dirs
from snapscale.restorer.scaleup import SCALE_UP_SPAN, Attempt, request_freeze, scale_up, tracer
from snapscale.restorer.slots import Slots
from snapscale.restorer.specs import deployed_spec
from snapscale.restorer.standby import FILLERS_DIR, Fillers
from snapscale.shared import bus as busmod
from snapscale.shared.bus import (
    Bucket,
    DeploymentSpec,
    HostHeartbeat,
    M,
    PrefetchCommand,
    ReleaseCommand,
    ReplicaState,
    ScaleUpCommand,
    Tier,
    Verb,
    encode_message,
    lookup_entry,
)
from snapscale.shared.core import runtime
from snapscale.shared.core.errors import MessageError, RetryableError
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import CompatKey, CriuBinary, SandboxRegistry, find_criu, warn_kdat_cache
from snapscale.shared.store import HostCache, open_store

log = logging.getLogger(__name__)
LEDGER_KEEP_S = 24 * 3600.0  # the command stream keeps commands a day
PRUNE_EVERY_S = 3600.0
CATALOG_REFRESH_S = 15.0  # how often the inventory looks for new checkpoints of its keys


class Restorer:
    """Build with settings and config; `await run(stop)` until `stop` is set."""

    def __init__(self, settings: Settings, config: RestorerConfig, *, criu: CriuBinary | None = None) -> None:
        self.settings = settings
        self.config = config
        self._criu = criu
        self.host: Host | None = None
        self.ready = asyncio.Event()  # set once adoption is done and the consumers run
        # Set when a release frees a GPU or CPU slot: the scaler places on free slots it learns of
        # from heartbeats, so waiting for the next periodic one would stall a scale-up (up to 3 s).
        self._beat_now = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        s, c = self.settings, self.config
        s.require_signing_key()
        criu = self._criu if self._criu is not None else await asyncio.to_thread(find_criu, s.criu_path)
        await asyncio.to_thread(warn_kdat_cache)
        b = await busmod.open_bus(s, f"restorer-{c.host}", stop=stop)
        work = c.dirs(s)
        fillers: Fillers | None = None
        try:
            async with open_store(s.store) as store:
                cache = HostCache(s.cache_dir, s.cache_bytes)
                gpus = await asyncio.to_thread(inventory.probe_gpus)
                fillers = (
                    Fillers([g.uuid for g in gpus], standby=c.fill_standby, home=work / FILLERS_DIR)
                    if c.weights_fill == "host"
                    else None
                )
                tools = HostTools(
                    settings=s,
                    config=c,
                    bus=b,
                    criu=criu,
                    compat=CompatKeys(criu),
                    slots=Slots(gpus, c.cpu_slots),
                    ledger=Ledger(work / "commands"),
                    registry=SandboxRegistry(s.state_dir),  # where the freezer looks
                    checkpoints=Checkpoints(store, cache, s.signing_key),
                    forwards=Forwards(c, s.namespace),
                    hot=HotImages(c.hot_root(s), c.hot_images),
                    fillers=fillers,
                )
                h = Host(tools, Replicas())
                self.host = h
                tools.ledger.prune(time.time() - LEDGER_KEEP_S)
                await adopt(h)
                if fillers is not None:
                    await fillers.start()  # after adoption's sweep: ours are not leftovers
                await asyncio.to_thread(prune_run_dirs, h, time.time() - LEDGER_KEEP_S)
                tasks = [
                    runtime.guard(self._heartbeats(h, stop), "restorer heartbeat"),
                    runtime.guard(deaths.watch(h, stop), "replica deaths"),
                    runtime.guard(
                        self._serve(
                            tools, Verb.SCALE_UP, ScaleUpCommand, self.on_scale_up, stop, self.on_refused
                        ),
                        "scale-up",
                    ),
                    runtime.guard(
                        self._serve(tools, Verb.RELEASE, ReleaseCommand, self.on_release, stop), "release"
                    ),
                    runtime.guard(
                        self._serve(tools, Verb.PREFETCH, PrefetchCommand, self.on_prefetch, stop), "prefetch"
                    ),
                ]
                self.ready.set()
                log.info("restorer %s serving (%d GPUs, %d CPU slots)", c.host, len(gpus), c.cpu_slots)
                await stop.wait()
                # drain: each consumer stops fetching and gives the commands it has in flight drain_s to
                # finish, then cancels them (redelivered); the heartbeat and the death watch go on till then
                await asyncio.wait(tasks[2:])
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if fillers is not None:
                await fillers.close()
            await b.close()
        b.raise_if_lost()  # exit non-zero: a supervisor restarts a restorer that went deaf

    # --- consuming ---------------------------------------------------------------
    async def _serve(
        self,
        h: HostTools,
        verb: Verb,
        cls: type[M],
        handler: Callable[[M, Msg], Awaitable[None]],
        stop: asyncio.Event,
        refused: busmod.Refused | None = None,
    ) -> None:
        """The bus's consumer loop on this host's `verb` commands: up to `max_inflight` at once, each
        kept alive while it runs (a restore may outlast the ack wait); on stop, `drain_s` to finish."""
        await busmod.consume(
            h.bus,
            h.bus.subjects.cmd(verb, h.name),
            h.bus.subjects.durable("restorer", verb, h.name),
            cls,
            handler,
            ack_wait_s=h.config.ack_wait_s,
            max_deliver=5,
            concurrency=h.config.max_inflight,
            keepalive=True,
            drain_s=h.config.drain_s,
            stop=stop,
            refused=refused,
        )

    # --- restore -----------------------------------------------------------------
    async def on_refused(self, data: bytes, e: MessageError) -> None:
        """A scale-up the decoder refused: see refused.py."""
        await refused_scale_up(self._h(), data, e)

    async def on_scale_up(self, cmd: ScaleUpCommand, _m: Msg) -> None:
        h = self._h()
        t, r = h.tools, h.replicas
        prior = t.ledger.get(cmd.id)
        if prior is not None:
            log.info("restore %s for %s: duplicate (%s)", cmd.id, cmd.replica, prior.outcome or "in progress")
            return
        here = r.live.get(cmd.replica)
        if cmd.replica in r.starting or (here is not None and here.state is not ReplicaState.SUSPENDED):
            log.info("restore %s: replica %s is already here; nothing to do", cmd.id, cmd.replica)
            return
        run_dir = str(t.run_dir(cmd.replica, cmd.id))
        t.ledger.start(Entry(cmd.id, "scale-up", cmd.deployment, cmd.replica, time.time(), run_dir=run_dir))
        task = asyncio.create_task(self._run_scale_up(h, cmd), name=f"scale-up {cmd.replica}")
        r.starting[cmd.replica] = task
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we are being cancelled (shutdown): the command is redelivered
        finally:
            if r.starting.get(cmd.replica) is task:
                del r.starting[cmd.replica]

    async def _run_scale_up(self, h: Host, cmd: ScaleUpCommand) -> None:
        t, r = h.tools, h.replicas
        t0 = time.monotonic()
        run_dir = t.run_dir(cmd.replica, cmd.id)
        remaining = cmd.issued_at + cmd.deadline_s - time.time()
        spec: DeploymentSpec | None = None
        a: Attempt | None = None
        with tracer.start_as_current_span(
            SCALE_UP_SPAN,
            attributes={"snapscale.deployment": cmd.deployment, "snapscale.replica": cmd.replica,
                        "snapscale.command": cmd.id, "snapscale.host": t.name},
        ) as root:  # fmt: skip
            try:
                if remaining <= 0:
                    raise TimeoutError(f"deadline of {cmd.deadline_s:g}s passed before the restore started")
                spec = await deployed_spec(t.bus, cmd.deployment)
                grant = t.slots.reserve(cmd.replica, spec.gpus, list(cmd.gpu_uuids) or None)
                a = Attempt(cmd, spec, list(grant.gpu_uuids))
                compat_hash, compat_dict = await t.compat.for_spec(spec)
                root.set_attribute("snapscale.compat_hash", compat_hash)
                deadline = asyncio.timeout(remaining)
                try:
                    async with deadline:
                        lv = await scale_up(h, a, compat_hash, compat_dict)
                except TimeoutError:
                    if deadline.expired():
                        raise TimeoutError(f"deadline of {cmd.deadline_s:g}s exceeded") from None
                    raise
            except asyncio.CancelledError:
                t.slots.free(cmd.replica)
                await t.forwards.close(cmd.replica)
                await reap(run_dir)
                if cmd.replica in r.cancelled_by_release:
                    r.cancelled_by_release.discard(cmd.replica)
                    reason = "released while starting"
                else:
                    reason = "the restorer stopped while it was starting"
                await self._failed(t, cmd, a, reason)
                t.ledger.finish(cmd.id, ok=False, outcome=f"failed: {reason}")
                raise
            except Exception as e:
                t.slots.free(cmd.replica)
                await t.forwards.close(cmd.replica)
                await reap(run_dir)
                reason = describe(e)  # a failed cold boot's error already lists the tiers before it
                root.set_status(trace.StatusCode.ERROR, reason)
                await self._failed(t, cmd, a, reason)
                t.ledger.finish(cmd.id, ok=False, outcome=f"failed: {reason}")
                return
            r.live[cmd.replica] = lv
            assert lv.tier is not None and a is not None
            total = time.monotonic() - t0
            a.timings_s["total"] = round(total, 4)
            root.set_attribute("snapscale.tier", lv.tier.value)
            if a.reason:
                root.set_attribute("fallback.reason", a.reason)
            metrics.record_ready(lv.tier, lv.spec.name, total, a.timings_s, a.bytes)
            ev = events.live_event(t, lv, ReplicaState.READY, cmd.id, a.reason)
            await events.record(t.bus, replace(ev, timings_s=dict(a.timings_s), bytes=dict(a.bytes)))
            # asked before the ledger says done: after a crash in between, adoption asks again (same id)
            if lv.tier is Tier.COLD and lv.spec.freeze.after_ready and t.config.auto_freeze:
                try:
                    await request_freeze(t, lv, cmd.id)
                except Exception as e:  # the replica serves either way; the scaler may ask again
                    log.warning("auto-freeze request for %s failed: %s", cmd.replica, e)
            t.ledger.finish(cmd.id, ok=True, outcome=f"ready by {lv.tier.value}")

    async def _failed(self, t: HostTools, cmd: ScaleUpCommand, a: Attempt | None, reason: str) -> None:
        failed = ReplicaState.FAILED
        ev = events.event(t, cmd.deployment, cmd.replica, failed, command_id=cmd.id, reason=reason)
        timings, got = (dict(a.timings_s), dict(a.bytes)) if a else ({}, {})
        await events.record(t.bus, replace(ev, timings_s=timings, bytes=got))

    # --- release and prefetch ----------------------------------------------------------
    async def on_release(self, cmd: ReleaseCommand, _m: Msg) -> None:
        h = self._h()
        prior = h.tools.ledger.get(cmd.id)
        if prior is not None:
            log.info("release %s: duplicate (%s)", cmd.id, prior.outcome or "in progress")
            return
        h.tools.ledger.start(Entry(cmd.id, "release", cmd.deployment, cmd.replica, time.time()))
        outcome = await release(h, cmd)
        h.tools.ledger.finish(cmd.id, ok=True, outcome=outcome)
        self._beat_now.set()

    async def on_prefetch(self, cmd: PrefetchCommand, _m: Msg) -> None:
        t = self._h().tools
        if (prior := t.ledger.get(cmd.id)) is not None and prior.done:
            return
        t.ledger.start(Entry(cmd.id, "prefetch", cmd.deployment, "", time.time()))
        attrs = {"snapscale.deployment": cmd.deployment}
        # not "prefetch": that is the scale-up's phase, and the dashboard's breakdown must not mix them
        with tracer.start_as_current_span("prefetch.background", attributes=attrs) as span:
            spec = await deployed_spec(t.bus, cmd.deployment)
            compat_hash, _ = await t.compat.for_spec(spec)
            found = await find_checkpoint(t, cmd.deployment, compat_hash, cmd.checkpoint_id)
            if found.manifest is None:
                why = found.manifest_error or f"no checkpoint for key {compat_hash[:12]}"
                if found.manifest_error and found.manifest_error.startswith("store unreachable"):
                    raise RetryableError(f"prefetch {cmd.deployment}: {why}", delay_s=2.0)
                log.info("prefetch %s: nothing to prefetch: %s", cmd.deployment, why)
                t.ledger.finish(cmd.id, ok=False, outcome=f"nothing to prefetch: {why}")
                return
            try:
                rep = await t.checkpoints.prefetch(found.manifest)
            except RetryableError:
                raise
            except Exception as e:
                t.ledger.finish(cmd.id, ok=False, outcome=f"failed: {describe(e)}")
                log.warning("prefetch %s failed: %s", cmd.deployment, describe(e))
                return
            span.set_attributes(
                {"prefetch.bytes": rep.bytes_fetched, "prefetch.cached_chunks": rep.cached_chunks,
                 "prefetch.chunks": rep.chunks}
            )  # fmt: skip
            t.ledger.finish(cmd.id, ok=True, outcome=f"prefetched {rep.bytes_fetched} bytes")

    # --- inventory ---------------------------------------------------------------------
    async def _heartbeats(self, h: Host, stop: asyncio.Event) -> None:
        """Beat every interval on core NATS, which any live server carries at once. What takes
        JetStream (reading the deployments and the catalog, writing KV hosts) runs beside the beats:
        while a NATS cluster elects a stream leader those requests hang for seconds, and a beat held
        that long makes the scaler count the host lost."""
        t = h.tools
        pruned_at = time.monotonic()
        catalog_read_at = time.monotonic()
        keys = await _inventory_keys(t, learn=True)  # the first beat already names them
        reading: asyncio.Task[dict[str, str]] | None = None
        writing: asyncio.Task[None] | None = None
        try:
            while not stop.is_set():
                try:
                    if reading is not None and reading.done():
                        keys = _keys_read(reading, keys)
                        reading = None
                    if reading is None:
                        learn = time.monotonic() >= catalog_read_at + CATALOG_REFRESH_S
                        catalog_read_at = time.monotonic() if learn else catalog_read_at
                        reading = asyncio.create_task(_inventory_keys(t, learn), name="heartbeat keys")
                    hb = heartbeat_of(h, await t.compat.host_part(), keys)
                    await busmod.publish_core(t.bus, t.bus.subjects.evt_host(t.name), hb)
                    if writing is None or writing.done():
                        writing = asyncio.create_task(_put_host(t, hb), name="heartbeat KV write")
                except Exception as e:  # a missed beat is logged; the next one may get through
                    log.warning("heartbeat failed: %s", e)
                if time.monotonic() - pruned_at > PRUNE_EVERY_S:  # a long-lived restorer forgets old ids
                    pruned_at = time.monotonic()
                    await asyncio.to_thread(t.ledger.prune, time.time() - LEDGER_KEEP_S)
                await self._until_next_beat(stop, t.config.heartbeat_s)
        finally:
            for task in (reading, writing):
                if task is not None:
                    task.cancel()

    async def _until_next_beat(self, stop: asyncio.Event, timeout_s: float) -> None:
        """Sleep `timeout_s`, or less when stopping or when a release asked for a beat now."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._beat_now.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self._beat_now.clear()

    def _h(self) -> Host:
        if self.host is None:
            raise RuntimeError("restorer not started")
        return self.host


def heartbeat_of(h: Host, host_part: CompatKey, keys: dict[str, str]) -> HostHeartbeat:
    """The inventory for `evt.host.<host>` and KV `hosts`: this host's key (`host_part`), its
    slots, cache and replicas, and `keys`, its compat hash for each deployment."""
    t = h.tools
    return inventory.heartbeat(
        host=t.name,
        now=t.now(),
        compat_hash=host_part.hash(),
        compat=host_part.as_dict(),
        gpus=t.slots.gpu_view(),
        cpu_slots=t.slots.free_cpu_slots(),
        cached=t.checkpoints.inventory(),
        replicas=[lv.summary() for lv in h.replicas.live.values()],
        suspend_budget_bytes=t.config.suspend_budget_bytes,
        interval_s=t.config.heartbeat_s,
        compat_hashes=keys,
        started_at=t.started_at,
    )


async def _inventory_keys(t: HostTools, learn: bool) -> dict[str, str]:
    """This host's compat hash per deployment; with `learn`, the catalog's manifests for them too."""
    keys = await deployment_keys(t.bus, t.compat)
    if learn:
        await learn_catalog(t, keys)
    return keys


def _keys_read(task: asyncio.Task[dict[str, str]], last: dict[str, str]) -> dict[str, str]:
    """A finished read's keys, or `last` when it failed (the beat goes on with what it knew)."""
    if task.cancelled():
        return last
    if (e := task.exception()) is not None:
        log.info("heartbeat: deployments unreadable (%s): the last known keys go out", e)
        return last
    return task.result()


async def _put_host(t: HostTools, hb: HostHeartbeat) -> None:
    """KV `hosts` (what a starting scaler reads); a failed write is logged, the next beat retries."""
    try:
        await t.bus.kv[Bucket.HOSTS].put(t.name, encode_message(hb))
    except Exception as e:
        log.warning("heartbeat: KV hosts write failed: %s", e)


async def learn_catalog(t: HostTools, keys: dict[str, str]) -> None:
    """Read the manifests of the catalog's checkpoints for this host's keys, so the inventory
    reports how much of each the cache holds (after a restart too, before any restore)."""
    for deployment, compat_hash in keys.items():
        try:
            got = await lookup_entry(t.bus.kv[Bucket.CHECKPOINTS], deployment, compat_hash)
            if got is not None and got[0].checkpoint_id not in t.checkpoints.known:
                await t.checkpoints.manifest(got[0].manifest_key)
        except Exception as e:  # the inventory goes on with what it knows
            log.info("catalog entry of %s unreadable for the inventory: %s", deployment, e)
