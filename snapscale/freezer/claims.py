"""Auto-freeze claims in KV `leases`: one freezer per deployment + compat key across hosts.

Only the KV edges live here; who wins is decided by `decide.judge_claim`. Operator (forced)
freezes take no claim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js.errors import APIError
from nats.js.kv import KeyValue

from snapscale.freezer.decide import Claim, ClaimVerdict, judge_claim
from snapscale.shared import bus
from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError, RetryableError

log = logging.getLogger(__name__)

CLAIM_TYPE = "freeze-claim"


def claim_key(deployment: str, compat_hash: str) -> str:
    return f"freeze.{deployment}.{compat_hash}"


@dataclass(frozen=True)
class Held:
    """A claim we hold, with the KV revision that proves it (renew and release compare against it)."""

    key: str
    claim: Claim
    revision: int


async def read(kv: KeyValue, key: str) -> tuple[Claim | None, int]:
    got = await bus.kv_get(kv, key)
    if got is None:
        return None, 0
    data, rev = got
    try:
        return wire.decode(data, Claim, CLAIM_TYPE), rev
    except MessageError as e:
        # an unreadable claim protects nothing: treat it as expired so it is overwritten
        log.warning("claim %s unreadable (%s); taking it over", key, e)
        return Claim(host="?", command_id="?", expires_at=0.0), rev


async def try_claim(
    kv: KeyValue, deployment: str, compat_hash: str, *, host: str, command_id: str, now: float, ttl_s: float
) -> tuple[Held | None, Claim | None]:
    """Claim the key for this command. Returns (held, None) on success or (None, holder) when taken.

    Loses cleanly to a concurrent claimant: a CAS that fails is re-read and judged again.
    """
    key = claim_key(deployment, compat_hash)
    mine = Claim(host=host, command_id=command_id, expires_at=now + ttl_s)
    for _ in range(5):
        existing, rev = await read(kv, key)
        verdict = judge_claim(existing, host=host, command_id=command_id, now=now)
        if verdict is ClaimVerdict.HELD:
            return None, existing
        try:
            new_rev = await bus.kv_cas(
                kv, key, wire.encode(mine, CLAIM_TYPE), None if verdict is ClaimVerdict.CREATE else rev
            )
        except RetryableError:
            continue  # someone wrote in between: look again
        return Held(key=key, claim=mine, revision=new_rev), None
    raise RetryableError(f"claim {key}: contended five times in a row", delay_s=1.0)


async def renew(kv: KeyValue, held: Held, *, now: float, ttl_s: float) -> Held:
    """Push the expiry out; raises `RetryableError` if the claim was lost (taken after expiring)."""
    claim = Claim(host=held.claim.host, command_id=held.claim.command_id, expires_at=now + ttl_s)
    rev = await bus.kv_cas(kv, held.key, wire.encode(claim, CLAIM_TYPE), held.revision)
    return Held(key=held.key, claim=claim, revision=rev)


async def release(kv: KeyValue, held: Held) -> None:
    """Drop our claim unless someone took it over since; never raises for a lost claim."""
    try:
        await kv.delete(held.key, last=held.revision)
    except APIError as e:
        log.info("claim %s not released (%s): it moved on without us", held.key, e.description)
