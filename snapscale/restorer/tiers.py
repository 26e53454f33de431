"""Which tier a scale-up takes and why it did not take a faster one: pure decisions.

The service gathers the observations (suspended replicas, catalog entries, the manifest, the host
cache) and acts on the answer; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from snapscale.shared.bus import Tier
from snapscale.shared.core.errors import SnapscaleError
from snapscale.shared.core.quickinit import quick_init

SHORT_HASH = 12
# the members as module constants: on Python 3.11 `Tier.CACHE` is a slow class lookup (~0.3 us),
# and choose runs once per restore (the simulator makes millions)
_RESUME, _CACHE, _STORE, _COLD = Tier.RESUME, Tier.CACHE, Tier.STORE, Tier.COLD
_RESTORES = frozenset({_STORE, _CACHE})


@dataclass(frozen=True)
class Candidate:
    """A checkpoint the catalog offers for the deployment, under some compatibility key."""

    checkpoint_id: str
    compat_hash: str
    compat: Mapping[str, str] | None = None  # its manifest's key, when it was read
    created_at: float = 0.0


@quick_init  # one per restore
@dataclass(frozen=True)
class Observed:
    """What the restorer knows when it decides. Fields it did not look at stay at their defaults."""

    replica: str
    allow: frozenset[Tier]
    host_compat_hash: str
    host_compat: Mapping[str, str] = field(default_factory=dict)
    suspended: tuple[str, ...] = ()  # suspended replicas of the deployment here, preferred first
    entry: Candidate | None = None  # the catalog's entry for this host's key (or the pinned one)
    others: tuple[Candidate, ...] = ()  # entries of the deployment under other keys
    pinned: str | None = None  # the command pins this checkpoint id
    manifest_error: str | None = None  # the entry's manifest was refused: why
    need_bytes: int = 0  # non-zero chunk bytes the image needs
    cached_bytes: int = 0  # of those, already in the host cache
    tried: frozenset[Tier] = frozenset()  # tiers attempted that failed
    earlier: tuple[str, ...] = ()  # why they failed, in order


@quick_init  # one per restore
@dataclass(frozen=True)
class TierChoice:
    tier: Tier
    reason: str  # why no faster tier; "" for resume
    resume_replica: str | None = None
    checkpoint_id: str | None = None


def short(h: str) -> str:
    return h[:SHORT_HASH]


def compat_diff(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The fields whose values differ (or exist on one side only), sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def pick_suspended(replica: str, suspended: Iterable[str]) -> str | None:
    """The replica itself if it is suspended here, else the first suspended one of the deployment."""
    s = suspended if isinstance(suspended, tuple) else tuple(suspended)  # choose's: no copy per restore
    if replica in s:
        return replica
    return s[0] if s else None


def checkpoint_problem(o: Observed) -> str | None:
    """Why the catalog's checkpoint cannot be restored here, or None when it can."""
    if o.entry is None:
        return _missing_reason(o)
    if o.pinned is not None and o.entry.checkpoint_id != o.pinned:
        return f"pinned checkpoint {o.pinned} not in the catalog"
    if o.entry.compat_hash != o.host_compat_hash:
        return _mismatch_reason(o.entry, o.host_compat, o.host_compat_hash)
    if o.manifest_error is not None:
        return f"checkpoint {o.entry.checkpoint_id}: {o.manifest_error}"
    return None


def _missing_reason(o: Observed) -> str:
    if o.pinned is not None:
        for c in o.others:
            if c.checkpoint_id == o.pinned:
                return _mismatch_reason(c, o.host_compat, o.host_compat_hash)
        return f"pinned checkpoint {o.pinned} not in the catalog"
    base = f"no checkpoint for key {short(o.host_compat_hash)}"
    if not o.others:
        return base
    newest = max(o.others, key=lambda c: c.created_at)
    return f"{base}; {_mismatch_reason(newest, o.host_compat, o.host_compat_hash)}"


def _mismatch_reason(c: Candidate, host: Mapping[str, str], host_hash: str) -> str:
    if c.compat is None:
        return (
            f"compat mismatch with checkpoint {c.checkpoint_id}: key {short(c.compat_hash)}"
            f" != host {short(host_hash)} (its manifest could not be read)"
        )
    fields = compat_diff(c.compat, host) or ["<hash only>"]
    return f"compat mismatch with checkpoint {c.checkpoint_id}: {', '.join(fields)}"


def choose(o: Observed) -> TierChoice:
    """The fastest tier the observations allow, with every reason a faster one was passed over.

    Tiers in `o.tried` were attempted and failed (their reasons are in `o.earlier`); the choice
    goes on with slower tiers only, and a failed restore rules out both restore tiers.
    Raises `NoTierError` when the command allows none left.
    """
    reasons = list(o.earlier)
    # a retry goes on from where the last attempt failed: faster tiers were already explained
    restore_tried = bool(o.tried) and not _RESTORES.isdisjoint(o.tried)  # no set built per restore
    if not o.tried:
        if _RESUME not in o.allow:
            reasons.append("resume not allowed by the command")
        elif (r := pick_suspended(o.replica, o.suspended)) is not None:
            return TierChoice(_RESUME, "", r)
        else:
            reasons.append("no suspended replica")
    if not restore_tried:
        problem = _restore_problem(o)
        if problem is None:
            assert o.entry is not None
            ckpt = o.entry.checkpoint_id
            cached = o.cached_bytes >= o.need_bytes
            if cached and _CACHE in o.allow:
                return TierChoice(_CACHE, _join(reasons), None, ckpt)
            if _CACHE in o.allow:
                # one f-string, not a helper per number: this is every store restore's reason
                have, need = o.cached_bytes / 1e6, o.need_bytes / 1e6
                reasons.append(f"not in host cache ({have:.1f} MB of {need:.1f} MB cached)")
            else:
                reasons.append("cache not allowed by the command")
            if _STORE in o.allow:
                return TierChoice(_STORE, _join(reasons), None, ckpt)
            reasons.append("store not allowed by the command")
        else:
            reasons.append(problem)
    if _COLD not in o.allow:
        reasons.append("cold boot not allowed by the command")
        raise NoTierError(_join(reasons))
    return TierChoice(_COLD, _join(reasons))


def _restore_problem(o: Observed) -> str | None:
    if _STORE not in o.allow and _CACHE not in o.allow:
        return "restore not allowed by the command"
    return checkpoint_problem(o)


class NoTierError(SnapscaleError):
    """Every tier the command allows is ruled out; the message lists why."""


def _join(reasons: list[str]) -> str:
    return "; ".join([r for r in reasons if r])  # a list: join builds one from a generator anyway
