"""One policy over one trace on one fleet, in virtual time: a heap of timed events (a request
finding a deployment at zero, a replica ready, a freeze or prefetch done) between scaler ticks.

The decisions are the services' own functions: the scaler's `activation`, `decide`, `place`,
`choose_releases`, `needs_freeze` and `prefetch_targets`, the restorer's `choose` and
`over_budget`, the freezer's `before_claim`, `judge_claim` and `after_claim`. Only their I/O is
replaced: the fleet's state stands in for heartbeats, the heap for the bus. A deployment with no
replica and no traffic in its window is off the tick list and costs nothing until its next request.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from snapscale.restorer.tiers import Candidate, Observed, TierChoice, choose
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.placement import (
    Placement,
    place,
)
from snapscale.scaler.policy import activation, decide, steady_until
from snapscale.scaler.window import Window
from snapscale.shared.bus import (
    DeploymentSpec,
    ReplicaEvent,
    ReplicaState,
    ReplicaSummary,
    ScalingSpec,
    Tier,
)
from snapscale.simulate.down import NOTHING_RESERVED, Down
from snapscale.simulate.fleet import COMPAT, Fleet
from snapscale.simulate.policies import COLD_ONLY, Policy, Result
from snapscale.simulate.profile import GIB, Profile
from snapscale.simulate.samples import Samples
from snapscale.simulate.state import FROZEN, READY, WAKE, Dep, Rep
from snapscale.simulate.trace import Trace

Progress = Callable[[str, float, float], None]
# enum members as module constants: on Python 3.11 `Tier.CACHE` is a slow class lookup
_RESUME, _CACHE, _STORE, _READY = Tier.RESUME, Tier.CACHE, Tier.STORE, ReplicaState.READY
# what choose answers a command that allows cold boots only, whatever the host holds (a test checks)
_COLD_BOOT: TierChoice = choose(Observed("", COLD_ONLY, COMPAT))


# a young-generation collection per this many allocations, not Python's 700: a run allocates
# millions of short-lived messages, nearly none in a cycle, so most collections free nothing
GC_GEN0 = 1_000_000


@contextmanager
def few_collections() -> Iterator[None]:
    """Collect cycles less often while a run lasts: what exists before it (the trace, its samples)
    is moved out of the collector's sight (`gc.freeze`), young collections are rarer. Results do
    not depend on it (nothing reads the collector); the old settings come back after."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_GEN0, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


class Sim(Down):
    def __init__(self, trace: Trace, samples: list[Samples], policy: Policy, profile: Profile, *,
                 hosts: int, gpus_per_host: int, sampled: tuple[int, ...] = (),
                 cfg: ScalerConfig | None = None, scaling: ScalingSpec | None = None,
                 checkpoints: bool = True, skip: bool = True) -> None:  # fmt: skip
        self.trace, self.samples, self.policy, self.profile = trace, samples, policy, profile
        self.cfg = cfg or ScalerConfig()
        self.fleet = Fleet(hosts, gpus_per_host, int(profile.cache_gib * GIB), profile.hot_images,
                           int(profile.suspend_budget_gib * GIB))  # fmt: skip
        base = DeploymentSpec(name="base", command=["simulated"], gpus=1)
        base = replace(
            base,
            freeze=replace(base.freeze, after_ready=policy.freeze),
            scaling=replace(
                scaling or base.scaling,
                scale_to_zero_after_s=policy.scale_to_zero_after_s,
                release_mode=policy.release_mode,
            ),
        )
        self.deps = [
            Dep(replace(base, name=n), g, int(g * GIB))
            for n, g in zip(trace.names, trace.image_gib, strict=True)
        ]
        if checkpoints and policy.freeze:  # not the fleet's first day: yesterday froze every deployment
            for dep in self.deps:
                dep.ckpt = f"ck-{dep.spec.name}"
        self.res = Result(policy.name, policy.label)
        self.sampled = {d: trace.names[d] for d in sampled}
        for name in self.sampled.values():
            self.res.series[name] = [(0.0, 0)]
        # the timed events: the wakes of sleeping deployments (thousands, each popped once a
        # sleep) in a heap of their own, so the others' heap stays small; one order over both
        self.heap: list[tuple[float, int, int, int, str]] = []
        self.wakes: list[tuple[float, int, int, int, str]] = []
        self.seq = 0  # orders the events at one time, across both heaps
        # deployments resting with replicas, by the index of the tick that decides them next:
        # those ticks are known in advance, so they need no heap (see `_run`)
        self.resumes: dict[int, list[int]] = {}
        self.ids = 0  # replica and command ids: the same whichever events were pushed
        self.active: set[int] = set()
        self.now = 0.0
        self.skip = skip  # False: decide every active deployment every tick (the reference)
        self.k = 0  # the tick's index: its time is k * tick
        self.t_next = 0.0  # the next tick's time, (k + 1) * tick
        # stop, never freeze: no decision reads a ready replica in a heartbeat (`place` reads the
        # suspended ones, `choose_releases` the RSS only to suspend), so none is listed
        self.stop_only = policy.release_mode == "stop" and not policy.freeze
        self.cold_only = policy.tiers == COLD_ONLY
        self.latencies: dict[tuple[str, float], float] = {}  # (tier, image GiB) -> seconds

    # --- the loop ---------------------------------------------------------------------------
    def push(self, t: float, kind: int, d: int, what: str = "") -> None:
        self.seq += 1
        heapq.heappush(self.wakes if kind == WAKE else self.heap, (t, self.seq, kind, d, what))

    def run(self, progress: Progress | None = None) -> Result:
        with few_collections():
            return self._run(progress)

    def _run(self, progress: Progress | None) -> Result:
        t0 = time.perf_counter()
        horizon = self.trace.horizon_s
        for d, s in enumerate(self.samples):
            if len(s.times):
                self.push(s.times[0], WAKE, d)
        tick = self.cfg.tick_s
        k, shown = 1, t0
        heap, wakes = self.heap, self.wakes
        resumes, deps, active, res = self.resumes, self.deps, self.active, self.res
        events = 0
        while (t := k * tick) <= horizon:
            while True:  # the events due by t in (time, push order), the two heaps merged
                first = heap if heap and (not wakes or heap[0] < wakes[0]) else wakes
                if not first or first[0][0] > t:
                    break
                at, _seq, kind, d, what = heapq.heappop(first)
                self.now = at
                events += 1
                if kind == READY:  # the kinds by how often they come
                    self._ready(d, what, at)
                elif kind == WAKE:
                    self._wake(d, at)
                else:
                    self._event(at, kind, d, what)
            self.now, self.k, self.t_next = t, k, (k + 1) * tick
            # the resumes due at this tick, after the other events due by it: a resume only puts
            # a resting deployment back on the tick list, which none of those events reads for
            # it (a resting deployment has replicas, so no wake of it is pending)
            due = resumes.pop(k, None)
            if due is not None:
                events += len(due)  # timed events, as the others are
                for d in due:
                    if deps[d].resume_at == t:
                        deps[d].resume_at = None
                        active.add(d)
            order = sorted(active)  # an order that does not depend on who skipped
            res.decisions += len(order)  # one decision each
            for d in order:
                self._tick(d, t)
            if self.fleet.gpus_in_use > res.peak_gpus:
                res.peak_gpus = self.fleet.gpus_in_use
            if progress is not None and k % 600 == 0 and (w := time.perf_counter()) - shown >= 5.0:
                shown = w
                progress(self.policy.name, t, horizon)
            k += 1
        res.events += events
        self._finish(horizon)
        self.res.wall_s = time.perf_counter() - t0
        return self.res

    def _event(self, t: float, kind: int, d: int, what: str) -> None:
        """The rarer timed events (`_run` calls `_wake` and `_ready` itself)."""
        if kind == FROZEN:
            dep = self.deps[d]
            dep.ckpt = f"ck-{dep.spec.name}"
            dep.claim = None
            dep.freeze_done = True
        else:  # PREFETCHED
            dep = self.deps[d]
            if dep.ckpt is not None:
                self.fleet.cache_put(what, dep.ckpt, dep.nbytes)

    def _window(self, dep: Dep) -> Window:
        if dep.window is None:  # as if made when the scaler started, at 0
            dep.window = Window(dep.spec.scaling, 0.0)
        return dep.window

    def _wake(self, d: int, t: float) -> None:
        """A request finds the deployment at zero: the gateway reports it at once and the scaler
        starts replicas without waiting for a tick (Scaler._on_traffic)."""
        if d in self.active:
            return
        dep = self.deps[d]
        self.active.add(d)
        s = self.samples[d]
        dep.cursor = bisect_left(s.secs, int(t))
        w = self._window(dep)
        w.record(t, 1.0, 1)
        n = activation(w, dep.spec.scaling, len(dep.live), 1.0, 1, t)
        if n:
            self._scale_up(d, n, t)

    def _tick(self, d: int, t: float) -> None:
        dep = self.deps[d]
        s = self.samples[d]
        w = dep.window or self._window(dep)
        secs, c = s.secs, dep.cursor
        n = len(secs)
        if c < n and secs[c] < t:
            record, conc, arrivals = w.record, s.conc, s.arrivals
            while c < n and secs[c] < t:
                record(secs[c] + 0.5, conc[c], arrivals[c])
                c += 1
            dep.cursor = c
        current = len(dep.live)
        decision = decide(w, dep.spec.scaling, current, t)
        desired = decision.desired
        if desired > current:
            self._scale_up(d, desired - current, t)
        elif desired < current:
            self._scale_down(d, current - desired, t)
        if not dep.live:
            if w.stable_sum == 0.0 and w.panic_sum == 0.0:
                self._sleep(d, t)  # idle: its next request wakes it
        elif desired == current and self.skip and not (c < n and secs[c] < self.t_next):
            # (a sample for the next tick: it decides anyway)
            self._rest(d, steady_until(w, dep.spec.scaling, current, decision, t), c)

    def _rest(self, d: int, until: float, c: int) -> None:
        """Skip the ticks that would decide the same (`steady_until`) until the one that records
        the deployment's next sample: the first tick after its second."""
        tick, secs = self.cfg.tick_s, self.samples[d].secs
        k = self._first_tick(until, strict=False)
        if c < len(secs) and secs[c] < k * tick:  # else the sample's tick is k or later
            k = min(k, self._first_tick(float(secs[c]), strict=True))
        if k > self.k + 1:
            self.active.discard(d)
            self.deps[d].resume_at = k * tick
            self.resumes.setdefault(k, []).append(d)

    def _first_tick(self, at: float, *, strict: bool) -> int:
        """The index of the first tick at (or, strict, after) `at`; past the horizon: one past it."""
        tick = self.cfg.tick_s
        if at > self.trace.horizon_s:
            return int(self.trace.horizon_s // tick) + 1
        k = max(self.k, math.floor(at / tick) - 1)
        while k * tick < at or (strict and k * tick == at):
            k += 1
        return k

    def _sleep(self, d: int, t: float) -> None:
        self.active.discard(d)
        times = self.samples[d].times
        nxt = bisect_left(times, t)
        if nxt < len(times):
            self.push(times[nxt], WAKE, d)

    # --- up ------------------------------------------------------------------------------------
    def _replicas_on(self, dep: Dep) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in dep.live.values():
            out[r.host] = out.get(r.host, 0) + 1
        return out

    def _scale_up(self, d: int, n: int, t: float) -> None:
        dep, fleet = self.deps[d], self.fleet
        spec = dep.spec
        if fleet.gpus_free < spec.gpus:  # `place` finds no host with room: skip asking
            self.res.unplaceable += n
            return
        on = self._replicas_on(dep) if dep.live else {}
        name, ckpt = spec.name, dep.ckpt
        hosts = {h: fleet.heartbeat(h, name, ckpt, t) for h in fleet.candidates(name, ckpt, on, n, spec.gpus)}
        placed = place(spec, n, hosts, self._catalog(dep), on, NOTHING_RESERVED)
        if len(placed) < n:
            self.res.unplaceable += n - len(placed)
        for p in placed:
            self._start(d, p, t)

    def _start(self, d: int, p: Placement, t: float) -> None:
        dep, fleet = self.deps[d], self.fleet
        host = fleet.by_name[p.host]
        fleet.mark(host, p.gpu_uuids, True)
        self.ids += 1
        name = dep.spec.name
        asked = p.resume or f"{name}-{self.ids}"
        if self.cold_only:  # choose answers a command allowing only cold boots with one
            choice = _COLD_BOOT
        else:
            choice = choose(
                Observed(
                    replica=asked,
                    allow=self.policy.tiers,
                    host_compat_hash=COMPAT,
                    suspended=tuple(host.suspended_of.get(name, ())),
                    entry=self._entry(dep),
                    need_bytes=dep.nbytes,
                    cached_bytes=dep.nbytes if dep.ckpt in host.cache else 0,
                )
            )
        replica = choice.resume_replica or asked
        if choice.tier is _RESUME:
            fleet.unsuspend(p.host, replica)
            tier = "resume"
        elif choice.tier is _CACHE:
            assert dep.ckpt is not None
            tier = "hot" if dep.ckpt in host.hot else "cache"
            fleet.cache_put(p.host, dep.ckpt, dep.nbytes)  # a use: most recent in the LRU
        elif choice.tier is _STORE:
            assert dep.ckpt is not None
            tier = "store"
            self.res.store_bytes += dep.nbytes
            fleet.cache_put(p.host, dep.ckpt, dep.nbytes)
        else:
            tier = "cold"
        lat = self._latency(tier, dep.gib)
        self.res.restores[tier] += 1
        live = dep.live
        live[replica] = Rep(p.host, list(p.gpu_uuids), t, tier)
        if len(live) > dep.peak:
            dep.peak = len(live)
        self._series(d, t)
        self.push(t + lat, READY, d, replica)

    def _latency(self, tier: str, gib: float) -> float:
        """The profile's time for a restore of this tier and image size, worked out once."""
        lat = self.latencies.get((tier, gib))
        if lat is None:
            prof = self.profile
            at = {"resume": prof.resume, "hot": prof.hot, "cache": prof.cache, "store": prof.store}
            lat = self.latencies[tier, gib] = at.get(tier, prof.cold)(gib)
        return lat

    def _entry(self, dep: Dep) -> Candidate | None:
        """The catalog's entry for the fleet's one key, made once per checkpoint."""
        if dep.entry is None or dep.entry.checkpoint_id != dep.ckpt:
            dep.entry = Candidate(dep.ckpt, COMPAT) if dep.ckpt else None
        return dep.entry

    def _ready(self, d: int, replica: str, t: float) -> None:
        dep = self.deps[d]
        rep = dep.live.get(replica)
        if rep is None or rep.ev is not None:
            return
        name = dep.spec.name
        rep.ev = ReplicaEvent(name, replica, rep.host, _READY, t, gpu_uuids=rep.gpus)
        if not self.stop_only:
            self.fleet.set_ready(rep.host, ReplicaSummary(name, replica, _READY, rep.gpus, t, dep.nbytes))
        if dep.n_ready == 0:
            self._serve_waiting(d, t)
        dep.n_ready += 1
        if rep.tier in ("cache", "store") and dep.ckpt is not None:
            self.fleet.make_hot(rep.host, dep.ckpt)  # the restorer keeps the image it assembled
        if rep.tier == "cold" and dep.spec.freeze.after_ready:
            self._freeze(d, replica, rep.host, t)

    def _serve_waiting(self, d: int, t: float) -> None:
        """The requests held since no replica was ready go to this one (the gateway's queue)."""
        times = self.samples[d].times
        dep = self.deps[d]
        limit = dep.spec.scaling.queue_timeout_s
        waits = self.res.waits
        for i in range(bisect_left(times, dep.noready_since), bisect_left(times, t)):
            wait = t - times[i]
            if wait > limit:
                self.res.timeouts += 1
            else:
                waits.append(wait)

    # --- the end -------------------------------------------------------------------------------
    def _finish(self, horizon: float) -> None:
        for d, dep in enumerate(self.deps):
            for rep in dep.live.values():
                self.res.gpu_s += (horizon - rep.start) * len(rep.gpus)
            if dep.n_ready == 0:  # still held at the end: counted as not served
                times = self.samples[d].times
                self.res.timeouts += bisect_left(times, horizon) - bisect_left(times, dep.noready_since)
        self.res.peaks = [dep.peak for dep in self.deps]
