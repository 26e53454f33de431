"""The simulated hosts: GPUs, host cache, hot images, suspended replicas, and the heartbeat each
would send, which is what the scaler's placement reads.

`candidates` and `prefetch_candidates` narrow the fleet to the hosts `place` and
`prefetch_targets` could choose, so a decision costs a heartbeat or two, not a thousand;
tests/test_simulate.py checks they choose what the whole fleet would. What a heartbeat lists is
kept per host as it changes (free GPUs, each deployment's replicas, suspended bytes), so building
one copies, it does not search.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

from snapscale.shared.bus import GpuInfo, HostHeartbeat, ReplicaState, ReplicaSummary

_NONE: frozenset[str] = frozenset()
COMPAT = "sim-key"  # one GPU model, driver and runtime across the fleet: one compatibility key
GPU_BYTES = 141 * 10**9


@dataclass
class Suspended:
    deployment: str
    since: float
    rss_bytes: int


@dataclass
class SimHost:
    name: str
    gpus: list[GpuInfo]  # free ones as reported
    busy: list[GpuInfo]  # the same GPUs, taken
    view: list[GpuInfo]  # each GPU as the heartbeat reports it now
    free: int
    cache: OrderedDict[str, int] = field(default_factory=OrderedDict)  # checkpoint -> bytes, LRU first
    cache_used: int = 0
    hot: OrderedDict[str, None] = field(default_factory=OrderedDict)
    suspended: dict[str, Suspended] = field(default_factory=dict)  # replica -> what the budget reads
    suspended_bytes: int = 0
    # deployment -> replica -> summary, as the heartbeat lists them (suspended first)
    suspended_of: dict[str, dict[str, ReplicaSummary]] = field(default_factory=dict)
    ready_of: dict[str, dict[str, ReplicaSummary]] = field(default_factory=dict)
    idx: int = 0  # its place in the fleet: the names' order (zero-padded), compared as ints


class Fleet:
    def __init__(
        self, hosts: int, gpus_per_host: int, cache_bytes: int, hot_images: int, budget: int
    ) -> None:
        width = len(str(max(0, hosts - 1)))
        self.hosts: list[SimHost] = []
        for h in range(hosts):
            name = f"h{h:0{width}d}"
            free = [GpuInfo(i, f"{name}-g{i}", "H200", GPU_BYTES) for i in range(gpus_per_host)]
            busy = [GpuInfo(i, f"{name}-g{i}", "H200", GPU_BYTES, free=False) for i in range(gpus_per_host)]
            self.hosts.append(SimHost(name, free, busy, list(free), gpus_per_host, idx=h))
        self.by_name = {h.name: h for h in self.hosts}
        # a bare heartbeat per host: where a decision reads only that the host reports
        self.reporting = {h.name: HostHeartbeat(h.name, 0.0, COMPAT) for h in self.hosts}
        self.gpu_index = {g.uuid: g.index for h in self.hosts for g in h.gpus}
        self.cache_bytes = cache_bytes
        self.hot_images = hot_images
        self.budget = budget
        # hosts (their idx) by free GPU count, each list sorted by name: the best empty hosts in O(1)
        self.by_free: list[list[int]] = [[] for _ in range(gpus_per_host + 1)]
        self.by_free[gpus_per_host] = [h.idx for h in self.hosts]
        self.cached_on: dict[str, set[str]] = {}  # checkpoint -> hosts holding it whole
        self.suspended_on: dict[str, set[str]] = {}  # deployment -> hosts with one suspended
        self.gpus_in_use = 0
        self.gpus_total = hosts * gpus_per_host

    @property
    def gpus_free(self) -> int:
        return self.gpus_total - self.gpus_in_use

    # --- GPUs ----------------------------------------------------------------------------
    def mark(self, h: SimHost, uuids: list[str], taken: bool) -> None:
        """Each GPU's view as taken or free, the counts, and the host refiled by its free count."""
        before, index, view = h.free, self.gpu_index, h.view
        src = h.busy if taken else h.gpus
        for u in uuids:
            i = index[u]
            view[i] = src[i]
        n = len(uuids) if taken else -len(uuids)
        h.free = after = before - n
        self.gpus_in_use += n
        i = h.idx
        lst = self.by_free[before]
        del lst[bisect_left(lst, i)]
        insort(self.by_free[after], i)

    # --- replicas ------------------------------------------------------------------------------
    def set_ready(self, host: str, summary: ReplicaSummary) -> None:
        self.by_name[host].ready_of.setdefault(summary.deployment, {})[summary.replica] = summary

    def drop_ready(self, host: str, deployment: str, replica: str) -> None:
        h = self.by_name[host]
        mine = h.ready_of.get(deployment)
        if mine is not None:
            mine.pop(replica, None)
            if not mine:  # an empty map per host and deployment ever seen would add up
                del h.ready_of[deployment]

    def suspend(self, host: str, replica: str, s: Suspended) -> None:
        h = self.by_name[host]
        h.suspended[replica] = s
        h.suspended_bytes += s.rss_bytes
        summary = ReplicaSummary(s.deployment, replica, ReplicaState.SUSPENDED, rss_bytes=s.rss_bytes)
        h.suspended_of.setdefault(s.deployment, {})[replica] = summary
        self.suspended_on.setdefault(s.deployment, set()).add(host)

    def unsuspend(self, host: str, replica: str) -> None:
        h = self.by_name[host]
        s = h.suspended.pop(replica)
        h.suspended_bytes -= s.rss_bytes
        mine = h.suspended_of[s.deployment]
        del mine[replica]
        if not mine:
            del h.suspended_of[s.deployment]
            self.suspended_on[s.deployment].discard(host)

    # --- cache and hot images ---------------------------------------------------------------
    def cache_put(self, host: str, ckpt: str, nbytes: int) -> None:
        h = self.by_name[host]
        if ckpt in h.cache:
            h.cache.move_to_end(ckpt)
            return
        while h.cache and h.cache_used + nbytes > self.cache_bytes:
            old, b = h.cache.popitem(last=False)
            h.cache_used -= b
            self.cached_on[old].discard(host)
        if nbytes <= self.cache_bytes:
            h.cache[ckpt] = nbytes
            h.cache_used += nbytes
            self.cached_on.setdefault(ckpt, set()).add(host)

    def make_hot(self, host: str, ckpt: str) -> None:
        h = self.by_name[host]
        h.hot[ckpt] = None
        h.hot.move_to_end(ckpt)
        while len(h.hot) > self.hot_images:
            h.hot.popitem(last=False)

    # --- what placement reads ------------------------------------------------------------------
    def heartbeat(self, host: str, deployment: str, ckpt: str | None, now: float) -> HostHeartbeat:
        """The host's heartbeat as far as `deployment`'s decisions read it: its own replicas and
        its own checkpoint in the cache (placement looks at nothing else of it)."""
        h = self.by_name[host]
        sus, ready = h.suspended_of.get(deployment), h.ready_of.get(deployment)
        reps = list(sus.values()) if sus else []
        if ready:
            reps.extend(ready.values())
        size = h.cache.get(ckpt) if ckpt is not None else None
        cached = [ckpt] if ckpt is not None and size is not None else []
        return HostHeartbeat(  # positional, in field order: this runs per decision
            host,
            now,
            COMPAT,
            {},
            list(h.view),
            cached,
            {ckpt: size} if ckpt is not None and size is not None else {},
            reps,
            self.budget,
            h.suspended_bytes,
        )

    def release_heartbeat(self, host: str, deployment: str, now: float) -> HostHeartbeat:
        """The host's heartbeat as far as a release of `deployment`'s ready replicas reads it:
        `choose_releases` reads the released replica's summary (a ready one: its id is never a
        suspended one's) and the suspend budget, `needs_freeze` the compat key; neither reads
        the GPUs, the cache or the suspended replicas, so none is copied."""
        h = self.by_name[host]
        ready = h.ready_of.get(deployment)
        return HostHeartbeat(  # positional, in field order: this runs per release
            host,
            now,
            COMPAT,
            {},
            [],
            [],
            {},
            list(ready.values()) if ready else [],
            self.budget,
            h.suspended_bytes,
        )

    def _emptiest(self, n: int, gpus: int, skip: Collection[str]) -> list[str]:
        """The n hosts with the most free GPUs (at least `gpus`), then by name, not in `skip`."""
        out: list[str] = []
        hosts = self.hosts
        for k in range(len(self.by_free) - 1, max(0, gpus - 1), -1):
            for i in self.by_free[k]:
                if (name := hosts[i].name) not in skip:
                    out.append(name)
                    if len(out) >= n:
                        return out
        return out

    def candidates(
        self, deployment: str, ckpt: str | None, replicas_on: dict[str, int], n: int, gpus: int
    ) -> list[str]:
        """The hosts `place` can choose for `n` placements: the n first by the key it ranks hosts
        by (resume, cached, any; then this deployment's replicas on it, cached bytes, free GPUs,
        name) among those with room. A placement makes only its own host's key worse, so a host
        outside the n first is never reached: each new host `place` picks is the best left."""
        sus = self.suspended_on.get(deployment, _NONE)
        cached = self.cached_on.get(ckpt, _NONE) if ckpt is not None else _NONE
        if not (sus or cached or replicas_on):  # no host is known to it: the emptiest, in that order
            return self._emptiest(n, gpus, _NONE)
        known = sus | cached | replicas_on.keys()
        keyed: list[tuple[int, int, int, int, str]] = []
        for name in known:
            h = self.by_name[name]
            if h.free < gpus:
                continue
            have = h.cache[ckpt] if ckpt is not None and name in cached else 0
            rank = 0 if name in sus else 1 if name in cached else 3
            keyed.append((rank, replicas_on.get(name, 0), -have, -h.free, name))
        for name in self._emptiest(n, gpus, known):
            keyed.append((3, 0, 0, -self.by_name[name].free, name))
        keyed.sort()  # a few keys: sorting them is cheaper than heapq.nsmallest's heap
        return [key[-1] for key in keyed[:n]]

    def prefetch_candidates(self, ckpt: str, want: int, gpus: int) -> list[str]:
        """The hosts `prefetch_targets` can choose for `want` hosts: up to `want` that cache the
        checkpoint (they only count) and as many of the emptiest others as those leave to choose
        (its order: most free GPUs, then name; no host here holds part of a checkpoint)."""
        cached = self.cached_on.get(ckpt, set())
        have = list(itertools.islice(cached, want))
        return have + self._emptiest(want - len(have), gpus, cached) if len(have) < want else have


class ReleaseBeats(Mapping[str, HostHeartbeat]):
    """Every host's release heartbeat (`Fleet.release_heartbeat`) for one deployment at one moment,
    each built when first read: a scale-down hands `choose_releases` the fleet's heartbeats, as
    the scaler does, and it reads only the released replicas' hosts."""

    __slots__ = ("_deployment", "_fleet", "_now", "built")

    def __init__(self, fleet: Fleet, deployment: str, now: float) -> None:
        self._fleet, self._deployment, self._now = fleet, deployment, now
        self.built: dict[str, HostHeartbeat] = {}  # read so far

    def __getitem__(self, host: str) -> HostHeartbeat:
        hb = self.built.get(host)
        if hb is None:
            if host not in self._fleet.by_name:
                raise KeyError(host)
            hb = self.built[host] = self._fleet.release_heartbeat(host, self._deployment, self._now)
        return hb

    def __iter__(self) -> Iterator[str]:
        return iter(self._fleet.by_name)

    def __len__(self) -> int:
        return len(self._fleet.by_name)
