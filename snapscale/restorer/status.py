"""`snapscale status`: hosts (from KV hosts), replicas (KV replicas), checkpoints (the catalog)
and each host's cache contents, as a readable table or JSON. Reads only; changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from nats.js.kv import KeyValue

from snapscale.shared import bus as busmod
from snapscale.shared.bus import (
    Bucket,
    Bus,
    CatalogEntry,
    FreezeRefusal,
    HostHeartbeat,
    ReplicaEvent,
    decode_message,
    list_entries,
    read_refusals,
)
from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError
from snapscale.shared.core.tables import table
from snapscale.shared.core.units import format_size, format_time


@dataclass(frozen=True)
class Status:
    hosts: list[HostHeartbeat] = field(default_factory=list)
    replicas: list[ReplicaEvent] = field(default_factory=list)
    checkpoints: list[CatalogEntry] = field(default_factory=list)
    refusals: list[FreezeRefusal] = field(default_factory=list)  # keys whose freeze was refused
    unreadable: list[str] = field(default_factory=list)  # KV keys whose values did not decode


async def _values(kv: KeyValue | None) -> list[tuple[str, bytes]]:
    if kv is None:  # the bucket does not exist yet: nothing ever wrote to it
        return []
    out = []
    for k in sorted(await busmod.kv_keys(kv)):
        got = await busmod.kv_get(kv, k)
        if got is not None:
            out.append((k, got[0]))
    return out


async def gather(b: Bus) -> Status:
    """What KV holds; a bucket that does not exist reads as empty (nothing is created)."""
    st = Status()
    for k, data in await _values(b.kv.get(Bucket.HOSTS)):
        try:
            st.hosts.append(decode_message(data, HostHeartbeat))
        except MessageError:
            st.unreadable.append(f"hosts/{k}")
    for k, data in await _values(b.kv.get(Bucket.REPLICAS)):
        try:
            st.replicas.append(decode_message(data, ReplicaEvent))
        except MessageError:
            st.unreadable.append(f"replicas/{k}")
    if (catalog := b.kv.get(Bucket.CHECKPOINTS)) is not None:
        st.checkpoints.extend(await list_entries(catalog))
    st.refusals.extend(await refusals(b))
    return st


async def refusals(b: Bus) -> list[FreezeRefusal]:
    """The deployment + key pairs that cannot be frozen (bus/refusals.py), oldest first."""
    got = read_refusals(await _values(b.kv.get(Bucket.LEASES)))
    return sorted(got, key=lambda r: (r.since, r.deployment))


def to_json(st: Status) -> bytes:
    return wire.canonical(st)


def _age(ts: float, now: float) -> str:
    s = max(0.0, now - ts)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def _size(n: int) -> str:
    return format_size(n)


_table = partial(table, indent="  ", empty="(none)")


def render(st: Status, now: float | None = None) -> str:
    """The operator's view. Pure: `now` makes ages reproducible."""
    now = time.time() if now is None else now
    out: list[str] = ["HOSTS"]
    out.append(
        _table(
            ["HOST", "SEEN", "GPUS FREE", "CPU SLOTS", "REPLICAS", "SUSPENDED", "CACHED", "KEY"],
            [
                [
                    h.host,
                    _age(h.ts, now),
                    f"{sum(g.free for g in h.gpus)}/{len(h.gpus)}",
                    str(h.cpu_slots),
                    str(len(h.replicas)),
                    f"{_size(h.suspend_used_bytes)}/{_size(h.suspend_budget_bytes)}",
                    ",".join(h.cached_checkpoints) or "-",
                    h.compat_hash[:12],
                ]
                for h in st.hosts
            ],
        )
    )
    out += ["", "REPLICAS"]
    out.append(
        _table(
            ["DEPLOYMENT", "REPLICA", "HOST", "STATE", "TIER", "SINCE", "ENDPOINT", "CHECKPOINT", "REASON"],
            [
                [
                    r.deployment,
                    r.replica,
                    r.host,
                    r.state.value,
                    r.tier.value if r.tier else "-",
                    _age(r.ts, now),
                    r.endpoint or "-",
                    r.checkpoint_id or "-",
                    r.reason or "-",
                ]
                for r in sorted(st.replicas, key=lambda r: (r.deployment, r.replica))
            ],
        )
    )
    out += ["", "CHECKPOINTS"]
    out.append(
        _table(
            ["DEPLOYMENT", "CHECKPOINT", "KEY", "AGE", "SIZE", "FROM HOST", "PREVIOUS"],
            [
                [
                    c.deployment,
                    c.checkpoint_id,
                    c.compat_hash[:12],
                    _age(c.created_at, now),
                    _size(c.sizes.get("total", 0)),
                    c.host or "-",
                    c.previous_id or "-",
                ]
                for c in sorted(st.checkpoints, key=lambda c: (c.deployment, c.compat_hash))
            ],
        )
    )
    if st.refusals:
        out += [
            "",
            "CANNOT BE FROZEN (auto-freeze skipped until the spec or the key changes, or `snapscale freeze`)",
        ]
        out.append(
            _table(
                ["DEPLOYMENT", "KEY", "WHY", "SINCE", "FAILED", "LAST HOST"],
                [
                    [r.deployment, r.compat_hash[:12], r.line(),
                     f"{format_time(r.since)} ({_age(r.since, now)} ago)", str(r.failures), r.host]
                    for r in st.refusals
                ],
            )
        )  # fmt: skip
    out += ["", "HOST CACHES"]
    cache_rows = [
        [h.host, cid, _size(n), "complete" if cid in h.cached_checkpoints else "partial"]
        for h in st.hosts
        for cid, n in sorted(h.cached_bytes.items())
    ]
    out.append(_table(["HOST", "CHECKPOINT", "BYTES", "STATE"], cache_rows))
    if st.unreadable:
        out += ["", f"unreadable KV entries: {', '.join(st.unreadable)}"]
    return "\n".join(out)


def plain(st: Status) -> Any:
    return wire.to_plain(st)
