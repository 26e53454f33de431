"""The checkpoint catalog in KV `checkpoints`: which checkpoint serves a deployment on hosts
with a given compatibility key. Pure encoding plus two small KV edges.

Key: `<deployment>.<compat hash>`. An entry is written only after its manifest exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Annotated

from nats.js.kv import KeyValue

from snapscale.shared.bus import client as bus
from snapscale.shared.bus.messages import MAX_MESSAGE_BYTES, Bytes, Label, Timestamp
from snapscale.shared.bus.subjects import NAME_MAX, Id, Name
from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError
from snapscale.shared.core.limits import Text, Token

log = logging.getLogger(__name__)
CATALOG_TYPE = "catalog-entry"


@dataclass(frozen=True)
class CatalogEntry:
    """Which checkpoint serves a deployment on hosts with one compatibility key."""

    deployment: Name
    compat_hash: Id
    checkpoint_id: Id
    manifest_key: Annotated[str, Text(1024)]  # the store's key of the signed manifest
    created_at: Timestamp
    host: Annotated[str, Token(NAME_MAX, empty=True)] = ""
    previous_id: Id | None = None  # for rollback
    sizes: dict[Label, Bytes] = field(default_factory=dict)


def catalog_key(deployment: str, compat_hash: str) -> str:
    return f"{deployment}.{compat_hash}"


def encode_entry(e: CatalogEntry) -> bytes:
    return wire.encode(e, CATALOG_TYPE)


def decode_entry(data: bytes) -> CatalogEntry:
    return wire.decode(data, CatalogEntry, CATALOG_TYPE, max_bytes=MAX_MESSAGE_BYTES)


async def lookup_entry(kv: KeyValue, deployment: str, compat_hash: str) -> tuple[CatalogEntry, int] | None:
    """The entry and its KV revision, or None."""
    got = await bus.kv_get(kv, catalog_key(deployment, compat_hash))
    if got is None:
        return None
    data, rev = got
    return decode_entry(data), rev


async def publish_entry(kv: KeyValue, entry: CatalogEntry) -> CatalogEntry:
    """Put `entry`, remembering the id it replaces; compare-and-set against concurrent writers.

    Raises `RetryableError` if another freezer wrote in between: re-read and decide again.
    """
    current = await lookup_entry(kv, entry.deployment, entry.compat_hash)
    if current is None:
        await bus.kv_cas(kv, catalog_key(entry.deployment, entry.compat_hash), encode_entry(entry), None)
        return entry
    old, rev = current
    if old.checkpoint_id == entry.checkpoint_id:
        return old
    new = replace(entry, previous_id=old.checkpoint_id)
    await bus.kv_cas(kv, catalog_key(entry.deployment, entry.compat_hash), encode_entry(new), rev)
    return new


async def list_entries(kv: KeyValue, deployment: str | None = None) -> list[CatalogEntry]:
    """The entries (of `deployment`); one that does not decode is logged and left out, so a bad
    value under one key never fails a scale-up that would otherwise boot cold."""
    out: list[CatalogEntry] = []
    for k in await bus.kv_keys(kv):
        if deployment is not None and not k.startswith(f"{deployment}."):
            continue
        got = await bus.kv_get(kv, k)
        if got is None:
            continue
        try:
            out.append(decode_entry(got[0]))
        except MessageError as e:
            log.warning("catalog entry %s unreadable, left out: %s", k, e)
    return out
