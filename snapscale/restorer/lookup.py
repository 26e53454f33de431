"""Finding the checkpoint for a scale-up: the catalog entry for this host's key, the manifest
read and verified from the store, how much of it the host cache already holds.

Every refusal becomes a readable reason for the tier decision; nothing here restores or boots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from snapscale.restorer.errors import describe
from snapscale.restorer.host import HostTools
from snapscale.restorer.tiers import Candidate
from snapscale.shared.bus import Bucket, CatalogEntry, list_entries
from snapscale.shared.store import Manifest, ManifestError, NotFoundError, RetryableStoreError, manifest_key

log = logging.getLogger(__name__)


@dataclass
class Found:
    entry: Candidate | None = None
    catalog_entry: CatalogEntry | None = None
    others: list[Candidate] = field(default_factory=list)
    manifest: Manifest | None = None
    manifest_error: str | None = None
    need_bytes: int = 0
    cached_bytes: int = 0


def _candidate(e: CatalogEntry, m: Manifest | None = None) -> Candidate:
    return Candidate(e.checkpoint_id, e.compat_hash, dict(m.compat) if m else None, e.created_at)


def store_problem(e: BaseException) -> str:
    """How a failed manifest read reads to an operator."""
    if isinstance(e, ManifestError):
        return f"manifest refused: {e.reason}"
    if isinstance(e, NotFoundError):
        return f"manifest missing from the store ({e.key})"
    return describe(e) if isinstance(e, RetryableStoreError) else f"store unreachable: {describe(e)}"


async def find_checkpoint(t: HostTools, deployment: str, compat_hash: str, pinned: str | None) -> Found:
    """The catalog's checkpoint for `deployment` on this host's key, read and checked."""
    entries = await list_entries(t.bus.kv[Bucket.CHECKPOINTS], deployment)
    mine = [e for e in entries if e.compat_hash == compat_hash]
    entry = mine[0] if mine else None
    if pinned is not None and entry is not None and entry.checkpoint_id != pinned:
        if entry.previous_id == pinned:  # rolling back to the one it replaced
            entry = CatalogEntry(
                deployment,
                compat_hash,
                pinned,
                manifest_key(deployment, pinned),
                entry.created_at,
                entry.host,
            )
        else:
            entry = None
    found = Found(catalog_entry=entry)
    others = [e for e in entries if e.compat_hash != compat_hash]
    if entry is None:
        found.others = [_candidate(e) for e in others]
        if others:
            # read the newest other key's manifest so the reason can name the fields that differ
            newest = max(others, key=lambda e: e.created_at)
            if pinned is not None:
                newest = next((e for e in others if e.checkpoint_id == pinned), newest)
            try:
                m = await t.checkpoints.manifest(newest.manifest_key)
                found.others = [_candidate(e, m if e is newest else None) for e in others]
            except Exception as e:
                log.info("manifest of %s unreadable for the compat diff: %s", newest.checkpoint_id, e)
        return found
    found.entry = _candidate(entry)
    try:
        m = await t.checkpoints.manifest(entry.manifest_key)
    except Exception as e:
        found.manifest_error = store_problem(e)
        return found
    if m.compat_hash != compat_hash or m.checkpoint_id != entry.checkpoint_id or m.deployment != deployment:
        found.manifest_error = (
            f"manifest {m.checkpoint_id} (key {m.compat_hash[:12]}) does not match its catalog entry"
        )
        return found
    found.manifest = m
    found.entry = _candidate(entry, m)
    found.cached_bytes, found.need_bytes = t.checkpoints.cached(m)
    return found
