"""Where new replicas go and which ones go away: pure functions over host heartbeats and the catalog.

Scale-up prefers, in order: resuming a suspended replica, a host whose cache holds the
checkpoint, a partially cached host (by bytes), any host with room; ties spread a deployment's
replicas. GPUs promised by commands still in flight are never handed out twice. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import NamedTuple

from snapscale.shared.bus import (
    DeploymentSpec,
    HostHeartbeat,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
)
from snapscale.shared.core.quickinit import quick_init

RANK = {"resume": 0, "cached": 1, "partial": 2, "any": 3}
_WHY = tuple(RANK)  # by rank
# enum members as module constants: on Python 3.11 `ReplicaState.SUSPENDED` is a slow class lookup
_SUSPENDED, _SUSPEND, _STOP = ReplicaState.SUSPENDED, ReleaseMode.SUSPEND, ReleaseMode.STOP


@quick_init  # one per replica placed or released
@dataclass(frozen=True)
class Placement:
    host: str
    gpu_uuids: list[str]
    why: str  # resume | cached | partial | any
    resume: str | None = None  # the suspended replica to bring back (its id is kept)
    checkpoint_id: str | None = None  # the catalog's checkpoint for this host's key, if any


@dataclass
class Reservations:
    """Capacity promised to commands the hosts have not reported yet (by host)."""

    gpus: dict[str, set[str]] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    resuming: set[str] = field(default_factory=set)  # suspended replicas a command is resuming
    suspend_bytes: dict[str, int] = field(default_factory=dict)  # RAM promised to suspends in flight

    def take(self, p: Placement) -> None:
        if p.gpu_uuids:
            self.gpus.setdefault(p.host, set()).update(p.gpu_uuids)
        else:
            self.cpu[p.host] = self.cpu.get(p.host, 0) + 1
        if p.resume:
            self.resuming.add(p.resume)

    def give_back(self, host: str, gpu_uuids: Iterable[str], replica: str) -> None:
        uuids = list(gpu_uuids)
        if uuids:
            self.gpus.get(host, set()).difference_update(uuids)
        elif self.cpu.get(host, 0) > 0:
            self.cpu[host] -= 1
        self.resuming.discard(replica)


def host_key(hb: HostHeartbeat, deployment: str) -> str:
    """The host's compatibility hash for this deployment (the key covers the spec and runtime,
    so it is per deployment); a host that has not computed it yet offers its bare hash."""
    return hb.compat_hashes.get(deployment, hb.compat_hash)


def free_gpus(hb: HostHeartbeat, spec: DeploymentSpec, reserved: Reservations) -> list[str]:
    """Free GPUs of the model the deployment asks for, not promised to a command in flight."""
    held = reserved.gpus.get(hb.host, ())
    model = spec.gpu_model
    # stable: sorting first orders them as filtering first would, and saves a list a call
    gpus = sorted(hb.gpus, key=_INDEX)
    if held or model is not None:
        return [g.uuid for g in gpus if g.free and g.uuid not in held and (model is None or g.model == model)]
    return [g.uuid for g in gpus if g.free]  # nothing promised on the host, any model: the common case


_INDEX = attrgetter("index")
_KEY = itemgetter(0)


def free_cpu(hb: HostHeartbeat, reserved: Reservations) -> int:
    """`cpu_slots` is what the host has free now (the restorer reports its free slots), less
    the slots promised to commands it has not reported yet."""
    return hb.cpu_slots - reserved.cpu.get(hb.host, 0)


def _fit(hb: HostHeartbeat, spec: DeploymentSpec, reserved: Reservations) -> tuple[int, list[str]] | None:
    """(free units left, the free GPUs in index order: the first go next) if one replica fits
    on `hb`, else None."""
    if spec.gpus > 0:
        free = free_gpus(hb, spec, reserved)
        return (len(free), free) if len(free) >= spec.gpus else None
    slots = free_cpu(hb, reserved)
    return (slots, []) if slots > 0 else None


class _Offer(NamedTuple):
    """What one host offers the next replica: `place` ranks these, then refreshes the host it took."""

    rank: int
    have: int
    room: int
    free: list[str]  # its free GPUs in index order (none for a CPU deployment): the first go next
    suspended: list[str]
    ckpt: str | None
    cached: bool  # `ckpt` is whole in the host's cache


def _offer(
    hb: HostHeartbeat, spec: DeploymentSpec, catalog: Mapping[str, str], res: Reservations
) -> _Offer | None:
    fit = _fit(hb, spec, res)
    if fit is None:
        return None
    room, free = fit  # the whole free list: `_after` takes a placement's GPUs out of it
    ckpt = catalog.get(host_key(hb, spec.name))
    suspended = (
        [
            r.replica
            for r in hb.replicas
            if r.deployment == spec.name and r.state is _SUSPENDED and r.replica not in res.resuming
        ]
        if hb.replicas  # most hosts offered run none of the deployment: no comprehension to call
        else []
    )
    have = hb.cached_bytes.get(ckpt, 0) if ckpt else 0
    cached = bool(ckpt) and ckpt in hb.cached_checkpoints
    return _Offer(_rank(suspended, cached, have), have, room, free, suspended, ckpt, cached)


def _rank(suspended: list[str], cached: bool, have: int) -> int:
    """RANK of the offer's tier: resume, cached, partial, any."""
    return 0 if suspended else 1 if cached else 2 if have > 0 else 3


def _after(o: _Offer, p: Placement, here: bool, gpus: int) -> _Offer | None:
    """`o` once `p` is reserved, as `_offer` would work it out again: on `p`'s host (`here`) its
    GPUs (or one CPU slot) are no longer free, and no host offers the replica it resumes.
    Derived from `o` so that `place` need not copy and re-read the reservations."""
    free, room = o.free, o.room
    if here:
        if gpus > 0:
            free = [g for g in free if g not in p.gpu_uuids]
            room = len(free)
            if room < gpus:
                return None
        else:
            room -= 1
            if room <= 0:
                return None
    suspended = [r for r in o.suspended if r != p.resume] if p.resume else o.suspended
    return _Offer(_rank(suspended, o.cached, o.have), o.have, room, free, suspended, o.ckpt, o.cached)


def place(
    spec: DeploymentSpec,
    n: int,
    hosts: Mapping[str, HostHeartbeat],
    catalog: Mapping[str, str],
    replicas_on: Mapping[str, int],
    reserved: Reservations,
    avoid: frozenset[str] = frozenset(),
) -> list[Placement]:
    """Choose hosts for `n` new replicas of `spec` (fewer when the fleet is full).

    `catalog` maps a compat hash to the checkpoint serving this deployment on hosts with that
    key; `replicas_on` counts the deployment's live replicas per host; `avoid` names hosts that
    just failed this deployment. `reserved` is not changed: the caller takes each placement
    once its command is on its way. Each host's offer is worked out once; a placement changes
    only its own host's (and, resuming, the hosts listing that replica), so n placements over
    H hosts cost H offers and n updates of one, not n x H.
    """
    spread = dict(replicas_on)
    out: list[Placement] = []
    offers: dict[str, _Offer] = {}
    for host, hb in hosts.items():
        if host not in avoid and (o := _offer(hb, spec, catalog, reserved)) is not None:
            offers[host] = o
    for _ in range(n):
        # tier first (seconds of latency), then spread, then the most cached bytes and room
        best: tuple[int, int, int, int, str] | None = None
        for host, o in offers.items():
            key = (o.rank, spread.get(host, 0), -o.have, -o.room, host)
            if best is None or key < best:
                best = key
        if best is None:
            break
        host = best[-1]
        o = offers[host]
        resume = o.suspended[0] if o.suspended else None
        p = Placement(host, o.free[: spec.gpus], _WHY[o.rank], resume, o.ckpt)
        out.append(p)
        if len(out) == n:
            break  # no next placement reads the offers or the spread
        spread[host] = spread.get(host, 0) + 1
        changed = [h for h, x in offers.items() if resume in x.suspended] if resume else [host]
        for h in changed:
            if (x := _after(offers[h], p, h == host, spec.gpus)) is None:
                del offers[h]
            else:
                offers[h] = x
    return out


@quick_init  # one per replica placed or released
@dataclass(frozen=True)
class Release:
    replica: str
    host: str
    mode: ReleaseMode
    # what `why` says, kept as numbers and formatted only when read (a log line, the event)
    left: int | None = None  # the host's suspend budget left; None: not asked (stop, or no host)
    rss: int = 0
    reporting: bool = True  # the host's heartbeat was there

    @property
    def why(self) -> str:
        if self.left is not None:
            op = ">=" if self.mode is _SUSPEND else "<"
            return f"suspend budget left {self.left} B {op} rss {self.rss} B"
        return "release_mode=stop" if self.reporting else "host not reporting"


def choose_releases(
    spec: DeploymentSpec,
    n: int,
    ready: list[ReplicaEvent],
    hosts: Mapping[str, HostHeartbeat],
    reserved: Reservations,
) -> list[Release]:
    """Pick `n` of the deployment's ready replicas to release, and how.

    The gateway reports load per deployment, not per replica, so "idle first" is approximated:
    replicas on the host with most of this deployment go first (keeps the spread), then the
    most recently ready (the oldest have proven warm, with their caches and connections).
    A replica is suspended when `release_mode` allows it and its host has the RAM budget left,
    else stopped.
    """
    out: list[Release] = []
    if n <= 0 or not ready:
        return out
    order = ready
    if len(ready) > 1:
        per_host: dict[str, int] = {}
        for r in ready:
            per_host[r.host] = per_host.get(r.host, 0) + 1
        keyed = [((-per_host[r.host], -r.ts, r.replica), r) for r in ready]
        if n == 1:  # the common scale-down step: the least key is the sorted order's first
            order = [min(keyed, key=_KEY)[1]]
        else:
            keyed.sort(key=_KEY)
            order = [r for _k, r in keyed]
    budget_used = reserved.suspend_bytes  # copied before the first suspend adds to it
    suspending = spec.scaling.release_mode != "stop"
    for r in order[:n]:
        hb = hosts.get(r.host)
        if hb is None:
            out.append(Release(r.replica, r.host, _STOP, None, 0, False))
        elif suspending:
            rss = 0
            for s in hb.replicas:  # a loop, not next() over a generator: this runs per release
                if s.replica == r.replica:
                    rss = s.rss_bytes
                    break
            left = hb.suspend_budget_bytes - hb.suspend_used_bytes - budget_used.get(r.host, 0)
            if hb.suspend_budget_bytes > 0 and left >= max(rss, 1):
                out.append(Release(r.replica, r.host, _SUSPEND, left, rss))
                if budget_used is reserved.suspend_bytes:
                    budget_used = dict(budget_used)
                budget_used[r.host] = budget_used.get(r.host, 0) + rss
            else:
                out.append(Release(r.replica, r.host, _STOP, left, rss))
        else:
            out.append(Release(r.replica, r.host, _STOP))
    return out


def needs_freeze(
    host: HostHeartbeat | None,
    deployment: str,
    catalog: Mapping[str, str],
    refused: Mapping[str, object] | None = None,
) -> bool:
    """Releasing a deployment's last replica on `host` loses its warm state unless a checkpoint
    exists for the host's key; an unknown host cannot be frozen, nor a key whose freeze was
    refused (`refused`: compat hash -> record; the last replica would wait for a skip)."""
    if host is None:
        return False
    key = host_key(host, deployment)
    return key not in catalog and key not in (refused or {})


def prefetch_targets(
    spec: DeploymentSpec,
    hosts: Mapping[str, HostHeartbeat],
    catalog: Mapping[str, str],
    reserved: Reservations,
    want: int = 2,
) -> list[tuple[str, str]]:
    """(host, checkpoint id) pairs to warm so the next scale-from-zero restores from cache.

    Up to `want` hosts should hold the checkpoint; hosts that already do count. Candidates
    need a checkpoint for their key and room for a replica; most bytes present go first.
    """
    have = 0
    cands: list[tuple[int, int, str, str]] = []
    for host, hb in hosts.items():
        ckpt = catalog.get(host_key(hb, spec.name))
        if ckpt is None:
            continue
        if ckpt in hb.cached_checkpoints:
            have += 1
            continue
        fit = _fit(hb, spec, reserved)
        if fit is None:
            continue
        cands.append((-hb.cached_bytes.get(ckpt, 0), -fit[0], host, ckpt))
    cands.sort()
    return [(h, c) for _b, _r, h, c in cands[: max(0, want - have)]]
