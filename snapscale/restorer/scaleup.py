"""One scale-up: bring a replica up by the fastest tier that works, falling back to a cold boot.

resume (+ after_restore) -> lookup -> prefetch -> materialize -> engine restore -> ready, or
launch -> ready; every phase a span and a timing, every fallback a reason. Whatever half-started
is stopped before the next tier; the caller records the outcome and acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from opentelemetry import trace

from snapscale.restorer import events
from snapscale.restorer.checkpoints import Checkpoints
from snapscale.restorer.cleanup import reap
from snapscale.restorer.errors import ColdBootError, describe
from snapscale.restorer.host import Host, HostTools
from snapscale.restorer.hostfill import resume_source, weights_source
from snapscale.restorer.lookup import Found, find_checkpoint
from snapscale.restorer.release import wake
from snapscale.restorer.replicas import Live
from snapscale.restorer.tiers import Observed, TierChoice, choose, pick_suspended
from snapscale.shared import bus as busmod
from snapscale.shared import engine
from snapscale.shared.bus import (
    DeploymentSpec,
    FreezeCommand,
    ReplicaState,
    ScaleUpCommand,
    Tier,
    Verb,
)
from snapscale.shared.core import telemetry
from snapscale.shared.core.pause import pause_point
from snapscale.shared.engine import EngineError, Sandbox, read_weights
from snapscale.shared.store import ImageSink, Manifest, split_weights

log = logging.getLogger(__name__)
tracer = telemetry.tracer("snapscale.restorer")

SCALE_UP_SPAN = "scale_up"
_STARTING_STATE = {
    Tier.RESUME: ReplicaState.RESUMING,
    Tier.CACHE: ReplicaState.RESTORING,
    Tier.STORE: ReplicaState.RESTORING,
    Tier.COLD: ReplicaState.STARTING,
}


@dataclass
class Attempt:
    """What one scale-up has measured so far."""

    cmd: ScaleUpCommand
    spec: DeploymentSpec
    gpu_uuids: list[str]
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    tried: set[Tier] = field(default_factory=set)
    earlier: list[str] = field(default_factory=list)
    announced: ReplicaState | None = None
    reason: str = ""  # why the tier that ended ready was not a faster one
    checkpoint_id: str | None = None


@contextlib.contextmanager
def phase(a: Attempt, name: str, **attrs: str | int | float) -> Iterator[trace.Span]:
    """A span and a timing for one phase of the scale-up."""
    t0 = time.monotonic()
    with tracer.start_as_current_span(name, attributes=attrs) as span:
        try:
            yield span
        finally:
            a.timings_s[name] = round(a.timings_s.get(name, 0.0) + time.monotonic() - t0, 4)


async def announce(t: HostTools, a: Attempt, d: TierChoice, checkpoint_id: str | None = None) -> None:
    """Publish restoring/starting/resuming once per state the replica passes through."""
    state = _STARTING_STATE[d.tier]
    a.reason = d.reason
    a.checkpoint_id = checkpoint_id
    if a.announced is state:
        return
    a.announced = state
    ev = events.event(t, a.spec.name, a.cmd.replica, state, command_id=a.cmd.id, reason=d.reason)
    ev = replace(ev, tier=d.tier, checkpoint_id=checkpoint_id, gpu_uuids=list(a.gpu_uuids))
    await events.record(t.bus, ev)


async def scale_up(h: Host, a: Attempt, compat_hash: str, compat: dict[str, str]) -> Live:
    """Run the tiers in order until one ends ready, then forward a host port to the replica (before
    its ready event names the endpoint); raises what the last tier raised."""
    lv = await _tiers(h, a, compat_hash, compat)
    t = h.tools
    try:
        sb = await t.forwards.open(lv.sandbox)
    except BaseException:
        await _stop_quietly(t, lv.sandbox)
        raise
    if sb != lv.sandbox:
        t.registry.put(sb)
        lv.sandbox = sb
    return lv


async def _tiers(h: Host, a: Attempt, compat_hash: str, compat: dict[str, str]) -> Live:
    """Run the tiers in order until one ends ready; raises what the last one raised."""
    root = trace.get_current_span()
    root.set_attribute("snapscale.deployment", a.spec.name)
    root.set_attribute("snapscale.replica", a.cmd.replica)
    allow = frozenset(a.cmd.allow_tiers)
    base = Observed(
        replica=a.cmd.replica,
        allow=allow,
        host_compat_hash=compat_hash,
        host_compat=compat,
        pinned=a.cmd.checkpoint_id,
    )
    # Resume needs no lookup, so it is tried first; a command that allows neither resume nor a cold
    # boot (only the restore tiers) must still get its lookup, not a NoTierError before it.
    suspended = tuple(h.replicas.suspended_of(a.spec.name))
    if Tier.RESUME in allow and pick_suspended(a.cmd.replica, suspended) is not None:
        d = choose(replace(base, suspended=suspended))
        assert d.tier is Tier.RESUME and d.resume_replica is not None
        try:
            return await _resume(h, a, d, d.resume_replica)
        except Exception as e:  # any resume failure falls through to the next tier
            a.tried.add(Tier.RESUME)
            a.earlier.append(f"resume of {d.resume_replica} failed: {describe(e)}")
            log.warning("replica %s: %s", a.cmd.replica, a.earlier[-1])
    found: Found | None = None
    if Tier.STORE in allow or Tier.CACHE in allow:
        with phase(a, "lookup"):
            found = await find_checkpoint(h.tools, a.spec.name, compat_hash, a.cmd.checkpoint_id)
    d = choose(_observed(base, a, found))
    if d.tier in (Tier.STORE, Tier.CACHE):
        assert found is not None and found.manifest is not None
        try:
            return await _from_checkpoint(h.tools, a, d, found)
        except Exception as e:
            a.tried.add(d.tier)
            a.earlier = [r for r in (d.reason, f"restore of {d.checkpoint_id} failed: {describe(e)}") if r]
            log.warning("replica %s: %s", a.cmd.replica, a.earlier[-1])
            d = choose(_observed(base, a, found))
    return await _cold(h.tools, a, d)


def _observed(base: Observed, a: Attempt, found: Found | None) -> Observed:
    o = replace(base, tried=frozenset(a.tried), earlier=tuple(a.earlier))
    if found is None:
        return o
    return replace(
        o,
        entry=found.entry,
        others=tuple(found.others),
        manifest_error=found.manifest_error,
        need_bytes=found.need_bytes,
        cached_bytes=found.cached_bytes,
    )


async def _resume(h: Host, a: Attempt, d: TierChoice, old: str) -> Live:
    t, live = h.tools, h.replicas.live
    lv = live[old]
    # taken before the first await, so a concurrent scale-up cannot pick the same replica
    lv.state = ReplicaState.RESUMING
    try:
        await announce(t, a, d, lv.checkpoint_id)
        fill = t.config.weights_fill
        cache = t.checkpoints.cache
        async with resume_source(cache, fill, lv.sandbox, a.gpu_uuids, t.fillers) as src:
            with phase(a, "cuda_restore"):
                if lv.sandbox.gpu_uuids:
                    sb = await engine.resume(lv.sandbox, a.gpu_uuids)
                else:
                    wake(lv)
                    sb = lv.sandbox
            if src is not None and src.ready is not None:
                with phase(a, "weights_wait"):  # a filler's fill not done yet
                    await src.ready
            if a.spec.hooks.before_freeze and a.spec.hooks.after_restore:
                with phase(a, "after_restore"):  # weights released at the suspend come back
                    await engine.after_resume(sb, a.spec, src.source if src is not None else None)
        with phase(a, "ready_probe"):
            await engine.wait_ready(sb, a.spec.ready, cwd=a.spec.cwd)
    except BaseException:
        # a sandbox that failed to resume is in an unknown state: never hand it out again
        live.pop(old, None)
        await _stop_quietly(t, lv.sandbox)
        if old != a.cmd.replica:
            await _record_gone(t, lv, f"resume as {a.cmd.replica} failed")
        raise
    live.pop(old, None)
    if old != a.cmd.replica:
        t.registry.remove(old)
        sb = replace(sb, replica=a.cmd.replica)
        await _record_gone(t, lv, f"resumed as replica {a.cmd.replica}")
    t.registry.put(sb)
    return Live(a.spec, sb, ReplicaState.READY, Tier.RESUME, t.now(), lv.checkpoint_id)


async def _record_gone(t: HostTools, lv: Live, reason: str) -> None:
    replica = lv.sandbox.replica
    await events.record(t.bus, events.event(t, lv.spec.name, replica, ReplicaState.STOPPED, reason=reason))
    await events.remove(t.bus, lv.spec.name, lv.sandbox.replica)


async def _from_checkpoint(t: HostTools, a: Attempt, d: TierChoice, found: Found) -> Live:
    assert found.manifest is not None and found.entry is not None
    m = found.manifest
    await announce(t, a, d, m.checkpoint_id)
    image_dir = t.image_dir(a.cmd.replica, a.cmd.id)
    run_dir = t.run_dir(a.cmd.replica, a.cmd.id)
    # Assembled by an earlier restore of this checkpoint: no prefetch, no copy (docs/restorer.md).
    hot = t.hot.get(m.checkpoint_id) if t.hot is not None and d.tier is Tier.CACHE else None
    cache = t.checkpoints.cache
    if hot is not None and not all(cache.verified(w) for w in m.weight_digests()):
        hot = None  # weights outside the image not hashed by this process yet: prefetch them
    ok = False
    weights_fetch: asyncio.Task[None] | None = None  # when it runs beside the restore
    cache.pin(m.weight_digests())  # the workload reads them from the cache in after_restore
    try:
        if hot is not None:
            with phase(a, "materialize", **{"materialize.hot": True}):
                a.bytes.update({"fetched": 0, "joined": 0, "cached": found.cached_bytes,
                                "image": m.total_bytes, "hot": m.total_bytes})  # fmt: skip
        else:
            cold = found.cached_bytes < found.need_bytes
            weights_fetch = await _assemble(t.checkpoints, a, m, image_dir, overlap=cold)
        if m.weights:
            check_weights(hot or image_dir, m)
        with t.hot.reading(m.checkpoint_id) if t.hot is not None else contextlib.nullcontext():
            fill = t.config.weights_fill if m.weights else "workload"
            src_dir = hot or image_dir
            async with weights_source(
                fill, src_dir, cache, a.gpu_uuids, run_dir, t.fillers, weights_fetch
            ) as src:
                sb, report = await engine.restore(
                    a.spec,
                    src_dir,
                    a.cmd.replica,
                    gpu_uuids=a.gpu_uuids,
                    run_dir=run_dir,
                    criu=t.criu,
                    checkpoint_id=m.checkpoint_id,
                    weights=src.source if m.weights else None,
                    weights_ready=src.ready,
                )
        _spans_from(report.timings_s, a)
        # the engine's whole restore (netns and the steps between its phases too): with lookup and
        # materialize, what is left of `total` is the restorer's own time
        a.timings_s["engine_restore"] = report.timings_s.get("restore", 0.0)
        ok = True
    except BaseException as e:
        if hot is not None and t.hot is not None and isinstance(e, Exception):
            t.hot.discard(m.checkpoint_id)  # it may be what failed: the next restore rebuilds it
        await reap(run_dir)
        raise
    finally:
        if weights_fetch is not None and not weights_fetch.done():  # failed before it waited
            weights_fetch.cancel()
        if weights_fetch is not None:
            await asyncio.gather(weights_fetch, return_exceptions=True)
        cache.unpin(m.weight_digests())
        kept = ok and hot is None and t.hot is not None and t.hot.adopt(m.checkpoint_id, image_dir)
        if not kept:
            await asyncio.to_thread(shutil.rmtree, image_dir, True)
    t.registry.put(sb)
    return Live(a.spec, sb, ReplicaState.READY, d.tier, t.now(), m.checkpoint_id)


def check_weights(image_dir: Path, m: Manifest) -> None:
    """The image's weights record needs only chunks the manifest lists (prefetch brought those)."""
    record = read_weights(image_dir)
    if record is None:
        raise EngineError("restore", f"manifest {m.checkpoint_id} lists weights, its image has no record")
    if missing := set(record.chunk_sizes()) - m.weight_digests():
        raise EngineError(
            "restore", f"the image's weights record needs {len(missing)} chunks its manifest does not list"
        )


async def _assemble(
    c: Checkpoints, a: Attempt, m: Manifest, image_dir: Path, *, overlap: bool
) -> asyncio.Task[None] | None:
    """Prefetch `m`'s chunks into the host cache and rebuild its image dir from them.

    With `overlap` (some to fetch: the cache is cold or partly cold) materialize runs beside the
    prefetch: a chunk fetched from the store is written into the image by the prefetch from its
    buffer once it hashed right (and cached from the same buffer); one from the cache is copied once
    the prefetch has re-hashed it. Weights outside the image are fetched after the image is rebuilt
    (not beside it), and that prefetch is returned running: the restore starts meanwhile and waits
    for it before after_restore. With all cached, materialize waits for the whole prefetch, which
    re-hashes them before they are trusted.
    """
    image, rest = split_weights(m) if overlap and m.weights else (m, None)
    sink = ImageSink() if overlap else None
    with c.pinned(m):  # nothing evicts these chunks until the image is rebuilt
        # its own task, so its span is the root's child beside materialize's, not above it
        fetch = asyncio.create_task(_prefetch(c, a, image, sink), name=f"prefetch {m.checkpoint_id}")
        try:
            if not overlap:
                await asyncio.shield(fetch)
            with phase(a, "materialize"):
                placed = await c.materialize(m, image_dir, arriving=fetch if overlap else None, sink=sink)
            a.bytes.update(landed=placed.landed_bytes, copied=placed.copied_bytes)
            await fetch  # its last cache writes (a landed chunk is cached after it is placed)
            await pause_point("materialize")
        except BaseException:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            raise
    if rest is None:
        return None
    return asyncio.create_task(_prefetch(c, a, rest), name=f"prefetch weights {m.checkpoint_id}")


async def _prefetch(c: Checkpoints, a: Attempt, m: Manifest, sink: ImageSink | None = None) -> None:
    with phase(a, "prefetch", **{"snapscale.checkpoint": m.checkpoint_id}) as span:
        rep = await c.prefetch(m, sink)
        await pause_point("prefetch")
        gbps = rep.bytes_fetched / rep.seconds / 1e9 if rep.seconds > 0 else 0.0
        span.set_attributes(
            {
                "prefetch.bytes": rep.bytes_fetched,
                "prefetch.chunks": rep.chunks,
                "prefetch.cached_chunks": rep.cached_chunks,
                "prefetch.cached_bytes": rep.cached_bytes,
                "prefetch.gbps": round(gbps, 3),
                "prefetch.joined": rep.joined,
            }
        )
        # a joined prefetch reports the shared download's bytes: count them once, under "joined";
        # an image's and its weights' prefetches add up
        for k, n in (
            ("fetched", 0 if rep.joined else rep.bytes_fetched),
            ("joined", rep.bytes_fetched if rep.joined else 0),
            ("cached", rep.cached_bytes),
        ):
            a.bytes[k] = a.bytes.get(k, 0) + n
        a.bytes["image"] = m.total_bytes


# the engine's restore steps that are phases of a scale-up, under the engine's own names
ENGINE_PHASES = ("criu_restore", "cuda_restore", "weights_wait", "after_restore", "ready_probe")


def _spans_from(timings_s: dict[str, float], a: Attempt) -> None:
    """The engine's step timings as phase spans under the scale-up, laid end to end as they ran."""
    end = time.time_ns()
    steps = [(k, v) for k, v in timings_s.items() if k in ENGINE_PHASES and v >= 0]
    start = end - int(sum(v for _, v in steps) * 1e9)
    for name, secs in steps:
        span = tracer.start_span(name, start_time=start)
        span.end(end_time=start + int(secs * 1e9))
        start += int(secs * 1e9)
        a.timings_s[name] = round(a.timings_s.get(name, 0.0) + secs, 4)


async def _cold(t: HostTools, a: Attempt, d: TierChoice) -> Live:
    trace.get_current_span().set_attribute("fallback.reason", d.reason)
    await announce(t, a, d)
    run_dir = t.run_dir(a.cmd.replica, a.cmd.id) / "cold"
    sb: Sandbox | None = None
    try:
        with phase(a, "launch", **{"fallback.reason": d.reason}):
            sb = await engine.launch(a.spec, a.cmd.replica, gpu_uuids=a.gpu_uuids, run_dir=run_dir)
            t.registry.put(sb)
        with phase(a, "ready_probe"):
            await engine.wait_ready(sb, a.spec.ready, cwd=a.spec.cwd)
    except BaseException as e:
        if sb is not None:
            await _stop_quietly(t, sb)
        await reap(run_dir)
        if isinstance(e, Exception):
            raise ColdBootError(d.reason, describe(e)) from e
        raise
    return Live(a.spec, sb, ReplicaState.READY, Tier.COLD, t.now(), None)


async def _stop_quietly(t: HostTools, sb: Sandbox) -> None:
    try:
        await engine.stop(sb)
    except Exception as e:  # stopping is best effort here; the reap after it catches stragglers
        log.warning("stopping %s failed: %s", sb.replica, e)
    await t.forwards.close(sb.replica)
    t.registry.remove(sb.replica)


async def request_freeze(t: HostTools, lv: Live, command_id: str) -> None:
    """Hand a cold-booted replica to the freezer when its spec asks to be frozen once ready."""
    cmd = FreezeCommand(
        id=f"auto-{command_id}",
        deployment=lv.spec.name,
        replica=lv.sandbox.replica,
        issued_at=t.now(),
        keep_running=True,
    )
    subject = t.bus.subjects.cmd(Verb.FREEZE, t.name)
    await busmod.publish(t.bus, subject, cmd, msg_id=cmd.id)
    log.info("asked the freezer to freeze %s (%s)", lv.sandbox.replica, lv.spec.name)
