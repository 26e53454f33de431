"""Deployments that cannot be frozen, per compatibility key, in KV `leases` under
`unfreezable.<deployment>.<compat hash>`: the scaler writes one from a failed freeze's checkpoint
event, the freezer skips an auto-freeze of that key while it stands, and the client shows it.

Beside the freezer's claims in the same bucket: a standing refusal is a claim on the key that no
auto-freeze may take. The key includes the spec's hash (compat.py), so a new spec or a host with
another key starts clean; an operator's `snapscale freeze` (forced) tries again, and a success
removes the record. Pure encoding plus small KV edges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from nats.js.kv import KeyValue

from snapscale.shared.bus import client as bus
from snapscale.shared.bus.messages import MAX_MESSAGE_BYTES, CheckpointEvent, Count, Label, Reason, Timestamp
from snapscale.shared.bus.subjects import Id, Name, OptId
from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError

log = logging.getLogger(__name__)
REFUSAL_TYPE = "freeze-refusal"
PREFIX = "unfreezable"


@dataclass(frozen=True)
class FreezeRefusal:
    """A deployment that cannot be frozen on hosts with one compatibility key, and since when."""

    deployment: Name
    compat_hash: Id
    refusal: Label  # the named reason (engine.refusal)
    detail: Reason  # the failed freeze's reason, as its event said
    since: Timestamp  # the first failure of this key
    last: Timestamp
    failures: Count = 1
    host: Name = "unknown"
    command_id: OptId = ""  # of the last failure: a redelivered event counts once

    def line(self) -> str:
        """What `snapscale status` and `snapscale deployments` say."""
        return f"cannot be frozen: {self.refusal}"


def refusal_key(deployment: str, compat_hash: str) -> str:
    return f"{PREFIX}.{deployment}.{compat_hash}"


def next_refusal(prev: FreezeRefusal | None, ev: CheckpointEvent) -> FreezeRefusal | None:
    """The record after a checkpoint event, or None when the key has none (any more). Pure.

    A refused freeze records (or counts) its key; a checkpoint made for the key clears it; other
    events (skips, failures that are not the workload's) leave it as it was."""
    if ev.ok:
        return None if (ev.checkpoint_id and not ev.skipped) else prev
    if not ev.refusal or not ev.compat_hash:
        return prev
    if prev is None:
        return FreezeRefusal(
            deployment=ev.deployment,
            compat_hash=ev.compat_hash,
            refusal=ev.refusal,
            detail=ev.reason,
            since=ev.ts,
            last=ev.ts,
            host=ev.host,
            command_id=ev.command_id or "",
        )
    if ev.command_id and ev.command_id == prev.command_id:
        return prev
    return replace(
        prev,
        refusal=ev.refusal,
        detail=ev.reason,
        last=max(prev.last, ev.ts),
        failures=prev.failures + 1,
        host=ev.host,
        command_id=ev.command_id or "",
    )


def encode_refusal(r: FreezeRefusal) -> bytes:
    return wire.encode(r, REFUSAL_TYPE)


def decode_refusal(data: bytes) -> FreezeRefusal:
    return wire.decode(data, FreezeRefusal, REFUSAL_TYPE, max_bytes=MAX_MESSAGE_BYTES)


async def lookup_refusal(kv: KeyValue, deployment: str, compat_hash: str) -> FreezeRefusal | None:
    got = await bus.kv_get(kv, refusal_key(deployment, compat_hash))
    if got is None:
        return None
    try:
        return decode_refusal(got[0])
    except MessageError as e:  # an unreadable record refuses nothing
        log.warning("refusal %s unreadable (%s); ignored", refusal_key(deployment, compat_hash), e)
        return None


async def store_refusal(kv: KeyValue, deployment: str, compat_hash: str, r: FreezeRefusal | None) -> None:
    """Write the record, or remove it (None)."""
    key = refusal_key(deployment, compat_hash)
    if r is None:
        await kv.delete(key)
    else:
        await kv.put(key, encode_refusal(r))


def read_refusals(values: list[tuple[str, bytes]]) -> list[FreezeRefusal]:
    """The readable records among a bucket's (key, value) pairs. Pure."""
    out: list[FreezeRefusal] = []
    for key, data in values:
        if not key.startswith(f"{PREFIX}."):
            continue
        try:
            out.append(decode_refusal(data))
        except MessageError as e:
            log.warning("refusal %s unreadable (%s); ignored", key, e)
    return out
