"""The message types on NATS, as frozen dataclasses, with their wire encode/decode.

Each type has one `TYPE` name; `encode_message` / `decode_message` are the only way on or off
the wire. A field's annotation is its validation: ids and names that become subject tokens, KV
keys or paths are `Name`/`Id` (subjects.py), numbers declare their range, free text its length,
so a message kind is checked in one place, by the decoder, before any handler runs; schema.py
writes the same declarations into docs/schema/messages.json. Replica states and their allowed
transitions live here too (one table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, ClassVar, Literal, Protocol, TypeVar

from snapscale.shared.bus.subjects import Id, Name, OptId
from snapscale.shared.core import wire
from snapscale.shared.core.limits import Range, Text
from snapscale.shared.core.quickinit import quick_init

MAX_MESSAGE_BYTES = 256 * 1024  # a heartbeat of a host with hundreds of replicas fits many times
MAX_CONCURRENCY = 1e6  # requests in flight for one deployment: more is a broken gateway, not load
MAX_DEADLINE_S = 7 * 24 * 3600.0  # a scale-up's deadline (the spec's ready_timeout_s)
# a heartbeat's interval: the scaler expires a host after 3 of them, so 0 or 1e308 would be absurd
HEARTBEAT_INTERVAL_S = Range(0.01, 3600)

Timestamp = Annotated[float, Range(0, 1e10)]  # unix seconds
Timing = Annotated[float, Range(-1e9, 1e9)]  # a measured duration (below 0 if the clock stepped back)
Count = Annotated[int, Range(0, 1e9)]
Bytes = Annotated[int, Range(0, 2**63 - 1)]
Label = Annotated[str, Text(128)]  # a key of timings, sizes or a compat key
Reason = Annotated[str, Text(65536)]


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
    deployment: Name
    ts: Timestamp  # unix seconds at the gateway
    arrivals: Count = 0  # requests that arrived since the previous event
    concurrency: Annotated[float, Range(0, MAX_CONCURRENCY)] = 0.0  # in flight + queued, now
    # the reporting gateway's id: with several gateways the scaler sums the latest of each source
    source: Label = ""


# --- commands (JetStream) -----------------------------------------------------------
@dataclass(frozen=True)
class ScaleUpCommand:
    """Bring replica `replica` of `deployment` up on the addressed host, by the fastest tier."""

    TYPE: ClassVar[str] = "scale-up"
    id: Id
    deployment: Name
    replica: Id
    issued_at: Timestamp
    deadline_s: Annotated[float, Range(0, MAX_DEADLINE_S)] = 300.0
    gpu_uuids: list[Id] = field(default_factory=list)  # chosen by the scaler; empty: restorer picks
    checkpoint_id: Id | None = None  # pin one; None: the catalog's entry for this host's key
    allow_tiers: list[Tier] = field(default_factory=lambda: list(Tier))


@dataclass(frozen=True)
class ReleaseCommand:
    TYPE: ClassVar[str] = "release"
    id: Id
    deployment: Name
    replica: Id
    issued_at: Timestamp
    mode: ReleaseMode = ReleaseMode.STOP


@dataclass(frozen=True)
class PrefetchCommand:
    TYPE: ClassVar[str] = "prefetch"
    id: Id
    deployment: Name
    issued_at: Timestamp
    checkpoint_id: Id | None = None


@dataclass(frozen=True)
class FreezeCommand:
    TYPE: ClassVar[str] = "freeze"
    id: Id
    deployment: Name
    replica: Id
    issued_at: Timestamp
    keep_running: bool = True
    # False (auto-freeze, scaler): freeze once per deployment + compat key across hosts, skipping
    # when the catalog has one or another host claimed it. True (operator verb): always freeze.
    force: bool = False


Command = ScaleUpCommand | ReleaseCommand | PrefetchCommand | FreezeCommand


# --- events -------------------------------------------------------------------------
@quick_init  # built per replica and per placement (the simulator: millions)
@dataclass(frozen=True)
class ReplicaEvent:
    """A replica changed state. `reason` says why a faster tier was not taken, or why it failed."""

    TYPE: ClassVar[str] = "replica"
    deployment: Name
    replica: Id
    host: Name
    state: ReplicaState
    ts: Timestamp
    command_id: Id | None = None
    tier: Tier | None = None
    reason: Reason = ""
    # Where to send requests: `<advertise addr>:<host port>` when the restorer forwards one (reachable
    # from other machines), else the sandbox's own address. `local_endpoint` is always the latter:
    # routed on the replica's host only, one hop less for a client on that host.
    endpoint: Annotated[str, Text(2048)] = ""
    checkpoint_id: Id | None = None
    gpu_uuids: list[Id] = field(default_factory=list)
    timings_s: dict[Label, Timing] = field(default_factory=dict)
    bytes: dict[Label, Bytes] = field(default_factory=dict)
    local_endpoint: Annotated[str, Text(2048)] = ""


@dataclass(frozen=True)
class CheckpointEvent:
    TYPE: ClassVar[str] = "checkpoint"
    deployment: Name
    host: Name
    ok: bool
    ts: Timestamp
    command_id: Id | None = None
    checkpoint_id: Id | None = None
    replica: OptId = ""
    compat_hash: OptId = ""
    compat: dict[Label, Reason] = field(default_factory=dict)
    reason: Reason = ""
    sizes: dict[Label, Bytes] = field(default_factory=dict)  # total, unique, new, zero
    timings_s: dict[Label, Timing] = field(default_factory=dict)
    skipped: bool = False  # ok and nothing frozen: the key already has a checkpoint or a claimant
    # not ok: the named reason this sandbox cannot be frozen (engine.refusal), "" for a failure that
    # is not the workload's (no such sandbox, no spec)
    refusal: Label = ""


@dataclass(frozen=True)
class GpuInfo:
    index: Annotated[int, Range(0, 4096)]
    uuid: Id
    model: Annotated[str, Text(256)]
    memory_bytes: Bytes
    free: bool = True


@quick_init  # built per replica and per placement (the simulator: millions)
@dataclass(frozen=True)
class ReplicaSummary:
    deployment: Name
    replica: Id
    state: ReplicaState
    gpu_uuids: list[Id] = field(default_factory=list)
    since: Timestamp = 0.0
    rss_bytes: Bytes = 0


@quick_init  # built per replica and per placement (the simulator: millions)
@dataclass(frozen=True)
class HostHeartbeat:
    """A restorer's inventory: published on `evt.host.<host>` and put in KV `hosts`."""

    TYPE: ClassVar[str] = "host"
    host: Name
    ts: Timestamp
    compat_hash: Id
    compat: dict[Label, Reason] = field(default_factory=dict)
    gpus: list[GpuInfo] = field(default_factory=list)
    cached_checkpoints: list[Id] = field(default_factory=list)  # fully in the host cache
    cached_bytes: dict[Id, Bytes] = field(default_factory=dict)  # checkpoint id -> bytes present
    replicas: list[ReplicaSummary] = field(default_factory=list)
    suspend_budget_bytes: Bytes = 0
    suspend_used_bytes: Bytes = 0
    cpu_slots: Count = 0  # free now: replicas of CPU deployments (gpus = 0) it can still start
    interval_s: Annotated[float, HEARTBEAT_INTERVAL_S] = 5.0
    # The compat key covers the deployment's spec and runtime, so it differs per deployment:
    # deployment -> this host's key hash for it (what catalog keys `<deployment>.<hash>` match).
    # `compat_hash` is the host's fields alone (no runtime or spec), for display and grouping.
    compat_hashes: dict[Name, Id] = field(default_factory=dict)
    # When this restorer started (its clock). A new value: it restarted, and holds only what it lists.
    started_at: Timestamp = 0.0


def encode_message(msg: _Msg) -> bytes:
    return wire.encode(msg, msg.TYPE)


def decode_message(data: bytes, cls: type[M]) -> M:
    """Decode `data` as `cls`, within its declared limits and `MAX_MESSAGE_BYTES`; raises
    `MessageError` naming the offending field."""
    return wire.decode(data, cls, cls.TYPE, max_bytes=MAX_MESSAGE_BYTES)


def salvage(data: bytes, cls: type[_Msg], names: tuple[str, ...]) -> dict[str, str]:
    """Of a message `decode_message` refused, the string fields `names` that pass their own limits
    (wire.salvage): enough to answer the refusal, e.g. report the replica it names failed."""
    got = wire.salvage(data, cls, names, max_bytes=MAX_MESSAGE_BYTES)
    return {k: v for k, v in got.items() if isinstance(v, str)}


COMMAND_TYPES: dict[str, type[_Msg]] = {
    c.TYPE: c for c in (ScaleUpCommand, ReleaseCommand, PrefetchCommand, FreezeCommand)
}


def decode_command(data: bytes, expected: Literal["scale-up", "release", "prefetch", "freeze"]) -> Command:
    """Decode a command of the verb its subject names; raises `MessageError` naming the field."""
    return decode_message(data, COMMAND_TYPES[expected])  # type: ignore[return-value]
