"""The simulated hosts: GPUs, host cache, hot images, suspended replicas, and the heartbeat each
would send, which is what the scaler's placement reads.

`candidates` narrows the fleet to the hosts `place` and `prefetch_targets` could choose, so a
decision costs a few heartbeats, not a thousand; tests/test_simulate.py checks it chooses what
the whole fleet would.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

from snapscale.shared.bus import GpuInfo, HostHeartbeat, ReplicaState, ReplicaSummary

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
    taken: list[bool]
    cache: OrderedDict[str, int] = field(default_factory=OrderedDict)  # checkpoint -> bytes, LRU first
    cache_used: int = 0
    hot: OrderedDict[str, None] = field(default_factory=OrderedDict)
    suspended: dict[str, Suspended] = field(default_factory=dict)
    ready: dict[str, ReplicaSummary] = field(default_factory=dict)  # replica -> summary (rss for releases)

    @property
    def free(self) -> int:
        return self.taken.count(False)

    def suspended_bytes(self) -> int:
        return sum(s.rss_bytes for s in self.suspended.values())


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
            self.hosts.append(SimHost(name, free, busy, [False] * gpus_per_host))
        self.by_name = {h.name: h for h in self.hosts}
        self.cache_bytes = cache_bytes
        self.hot_images = hot_images
        self.budget = budget
        # hosts by free GPU count, each list sorted by name: the best empty hosts, found in O(1)
        self.by_free: list[list[str]] = [[] for _ in range(gpus_per_host + 1)]
        self.by_free[gpus_per_host] = [h.name for h in self.hosts]
        self.cached_on: dict[str, set[str]] = {}  # checkpoint -> hosts holding it whole
        self.suspended_on: dict[str, set[str]] = {}  # deployment -> hosts with one suspended
        self.gpus_in_use = 0
        self.gpus_total = hosts * gpus_per_host

    @property
    def gpus_free(self) -> int:
        return self.gpus_total - self.gpus_in_use

    # --- GPUs ----------------------------------------------------------------------------
    def _refile(self, h: SimHost, before: int) -> None:
        lst = self.by_free[before]
        del lst[bisect.bisect_left(lst, h.name)]
        bisect.insort(self.by_free[h.free], h.name)

    def take(self, host: str, uuids: list[str]) -> None:
        h = self.by_name[host]
        before = h.free
        for u in uuids:
            h.taken[int(u.rsplit("-g", 1)[1])] = True
        self.gpus_in_use += len(uuids)
        self._refile(h, before)

    def give(self, host: str, uuids: list[str]) -> None:
        h = self.by_name[host]
        before = h.free
        for u in uuids:
            h.taken[int(u.rsplit("-g", 1)[1])] = False
        self.gpus_in_use -= len(uuids)
        self._refile(h, before)

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
        reps = [
            ReplicaSummary(deployment, r, ReplicaState.SUSPENDED, rss_bytes=s.rss_bytes)
            for r, s in h.suspended.items()
            if s.deployment == deployment
        ]
        reps.extend(s for s in h.ready.values() if s.deployment == deployment)
        cached = ckpt is not None and ckpt in h.cache
        return HostHeartbeat(
            host=host,
            ts=now,
            compat_hash=COMPAT,
            gpus=[b if t else f for f, b, t in zip(h.gpus, h.busy, h.taken, strict=True)],
            cached_checkpoints=[ckpt] if cached and ckpt is not None else [],
            cached_bytes={ckpt: h.cache[ckpt]} if cached and ckpt is not None else {},
            replicas=reps,
            suspend_budget_bytes=self.budget,
            suspend_used_bytes=h.suspended_bytes(),
        )

    def candidates(
        self, deployment: str, ckpt: str | None, replicas_on: dict[str, int], n: int, gpus: int
    ) -> list[str]:
        """The hosts that can rank first for `n` placements: those resuming, caching or already
        running the deployment, and the n emptiest others (by free GPUs, then name: the order
        `place` breaks ties in among hosts alike in everything else)."""
        out = set(self.suspended_on.get(deployment, ())) | set(replicas_on)
        if ckpt is not None:
            out |= self.cached_on.get(ckpt, set())
        got = 0
        for k in range(len(self.by_free) - 1, max(0, gpus - 1), -1):
            for name in self.by_free[k]:
                if name not in out:
                    out.add(name)
                    got += 1
                    if got >= n:
                        return sorted(out)
        return sorted(out)
