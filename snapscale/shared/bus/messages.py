"""The message types on NATS, as frozen dataclasses, with their wire encode/decode.

Each type has one `TYPE` name; `encode_message` / `decode_message` are the only way on or off
the wire. Replica states and their allowed transitions live here too (one table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Literal, Protocol, TypeVar

from snapscale.shared.core import wire


class ReplicaState(StrEnum):
    PENDING = "pending"
    STARTING = "starting"  # cold boot
    RESTORING = "restoring"
    RESUMING = "resuming"
    READY = "ready"
    RELEASING = "releasing"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    FAILED = "failed"


_S = ReplicaState
TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    _S.PENDING: frozenset({_S.STARTING, _S.RESTORING, _S.RESUMING}),
    _S.STARTING: frozenset({_S.READY}),
    # a restore that fails falls back to a cold boot of the same replica
    _S.RESTORING: frozenset({_S.READY, _S.STARTING}),
    _S.RESUMING: frozenset({_S.READY, _S.STARTING, _S.RESTORING}),
    _S.READY: frozenset({_S.RELEASING}),
    _S.RELEASING: frozenset({_S.STOPPED, _S.SUSPENDED}),
    _S.SUSPENDED: frozenset({_S.RESUMING, _S.RELEASING, _S.STOPPED}),
    _S.STOPPED: frozenset(),
    _S.FAILED: frozenset(),
}


def can_transition(old: ReplicaState, new: ReplicaState) -> bool:
    """`failed` is reachable from any live state; everything else follows the table."""
    if new is ReplicaState.FAILED:
        return old not in (ReplicaState.STOPPED, ReplicaState.FAILED)
    return new in TRANSITIONS[old]


class Tier(StrEnum):
    """How a replica came up, fastest first."""

    RESUME = "resume"
    CACHE = "cache"  # restored from a checkpoint already in the host cache
    STORE = "store"  # restored after prefetching the checkpoint from the store
    COLD = "cold"


class ReleaseMode(StrEnum):
    STOP = "stop"
    SUSPEND = "suspend"


class _Msg(Protocol):
    TYPE: ClassVar[str]


M = TypeVar("M", bound=_Msg)


# --- traffic (core NATS) ------------------------------------------------------------
@dataclass(frozen=True)
class TrafficEvent:
    """What a gateway saw for one deployment since its last event."""

    TYPE: ClassVar[str] = "traffic"
    deployment: str
    ts: float  # unix seconds at the gateway
    arrivals: int = 0  # requests that arrived since the previous event
    concurrency: float = 0.0  # in flight + queued, now


# --- commands (JetStream) -----------------------------------------------------------
@dataclass(frozen=True)
class ScaleUpCommand:
    """Bring replica `replica` of `deployment` up on the addressed host, by the fastest tier."""

    TYPE: ClassVar[str] = "scale-up"
    id: str
    deployment: str
    replica: str
    issued_at: float
    deadline_s: float = 300.0
    gpu_uuids: list[str] = field(default_factory=list)  # chosen by the scaler; empty: restorer picks
    checkpoint_id: str | None = None  # pin one; None: the catalog's entry for this host's key
    allow_tiers: list[Tier] = field(default_factory=lambda: list(Tier))


@dataclass(frozen=True)
class ReleaseCommand:
    TYPE: ClassVar[str] = "release"
    id: str
    deployment: str
    replica: str
    issued_at: float
    mode: ReleaseMode = ReleaseMode.STOP


@dataclass(frozen=True)
class PrefetchCommand:
    TYPE: ClassVar[str] = "prefetch"
    id: str
    deployment: str
    issued_at: float
    checkpoint_id: str | None = None


@dataclass(frozen=True)
class FreezeCommand:
    TYPE: ClassVar[str] = "freeze"
    id: str
    deployment: str
    replica: str
    issued_at: float
    keep_running: bool = True
    # False (auto-freeze, scaler): freeze once per deployment + compat key across hosts, skipping
    # when the catalog has one or another host claimed it. True (operator verb): always freeze.
    force: bool = False


Command = ScaleUpCommand | ReleaseCommand | PrefetchCommand | FreezeCommand


# --- events -------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaEvent:
    """A replica changed state. `reason` says why a faster tier was not taken, or why it failed."""

    TYPE: ClassVar[str] = "replica"
    deployment: str
    replica: str
    host: str
    state: ReplicaState
    ts: float
    command_id: str | None = None
    tier: Tier | None = None
    reason: str = ""
    # Where to send requests: `<advertise addr>:<host port>` when the restorer forwards one (reachable
    # from other machines), else the sandbox's own address. `local_endpoint` is always the latter:
    # routed on the replica's host only, one hop less for a client on that host.
    endpoint: str = ""
    checkpoint_id: str | None = None
    gpu_uuids: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    local_endpoint: str = ""


@dataclass(frozen=True)
class CheckpointEvent:
    TYPE: ClassVar[str] = "checkpoint"
    deployment: str
    host: str
    ok: bool
    ts: float
    command_id: str | None = None
    checkpoint_id: str | None = None
    replica: str = ""
    compat_hash: str = ""
    compat: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    sizes: dict[str, int] = field(default_factory=dict)  # total, unique, new, zero
    timings_s: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # ok and nothing frozen: the key already has a checkpoint or a claimant


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    model: str
    memory_bytes: int
    free: bool = True


@dataclass(frozen=True)
class ReplicaSummary:
    deployment: str
    replica: str
    state: ReplicaState
    gpu_uuids: list[str] = field(default_factory=list)
    since: float = 0.0
    rss_bytes: int = 0


@dataclass(frozen=True)
class HostHeartbeat:
    """A restorer's inventory: published on `evt.host.<host>` and put in KV `hosts`."""

    TYPE: ClassVar[str] = "host"
    host: str
    ts: float
    compat_hash: str
    compat: dict[str, str] = field(default_factory=dict)
    gpus: list[GpuInfo] = field(default_factory=list)
    cached_checkpoints: list[str] = field(default_factory=list)  # fully in the host cache
    cached_bytes: dict[str, int] = field(default_factory=dict)  # checkpoint id -> bytes present
    replicas: list[ReplicaSummary] = field(default_factory=list)
    suspend_budget_bytes: int = 0
    suspend_used_bytes: int = 0
    cpu_slots: int = 0  # free now: replicas of CPU deployments (gpus = 0) it can still start
    interval_s: float = 5.0
    # The compat key covers the deployment's spec and runtime, so it differs per deployment:
    # deployment -> this host's key hash for it (what catalog keys `<deployment>.<hash>` match).
    # `compat_hash` is the host's fields alone (no runtime or spec), for display and grouping.
    compat_hashes: dict[str, str] = field(default_factory=dict)
    # When this restorer started (its clock). A new value: it restarted, and holds only what it lists.
    started_at: float = 0.0


def encode_message(msg: _Msg) -> bytes:
    return wire.encode(msg, msg.TYPE)


def decode_message(data: bytes, cls: type[M]) -> M:
    """Decode `data` as `cls`; raises `MessageError` naming the offending field."""
    return wire.decode(data, cls, cls.TYPE)


COMMAND_TYPES: dict[str, type[_Msg]] = {
    c.TYPE: c for c in (ScaleUpCommand, ReleaseCommand, PrefetchCommand, FreezeCommand)
}


def decode_command(data: bytes, expected: Literal["scale-up", "release", "prefetch", "freeze"]) -> Command:
    """Decode a command of the verb its subject names; raises `MessageError` naming the field."""
    return decode_message(data, COMMAND_TYPES[expected])  # type: ignore[return-value]
