"""What to do with one freeze command, as pure functions of what was observed.

No I/O: the service reads the ledger, the catalog and the claim, asks here, then acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from snapscale.shared.bus import CatalogEntry, FreezeCommand, FreezeRefusal
from snapscale.shared.core.units import format_time


class Action(StrEnum):
    FREEZE = "freeze"
    SKIP = "skip"  # ok, nothing to do: the key already has a checkpoint or another host claimed it
    REPLAY = "replay"  # this command id was handled before: re-announce its outcome, do nothing new


@dataclass(frozen=True)
class Claim:
    """Who is freezing a deployment + compat key right now (auto-freezes only), and until when."""

    host: str
    command_id: str
    expires_at: float  # unix seconds; the holder renews it while it works


@dataclass(frozen=True)
class FreezeDecision:
    action: Action
    reason: str = ""
    checkpoint_id: str | None = None  # SKIP because of a catalog entry: that entry's checkpoint


class ClaimVerdict(StrEnum):
    CREATE = "create"  # nobody holds it: create the key
    TAKE = "take"  # held, but expired (its holder died): overwrite at its revision
    OURS = "ours"  # we hold it already (a redelivery of our own command): renew
    HELD = "held"  # another live holder: skip


def before_claim(
    cmd: FreezeCommand, *, done: bool, catalog: CatalogEntry | None, refused: FreezeRefusal | None = None
) -> FreezeDecision | None:
    """The decision if one can be made before claiming; None means "claim (or force) and freeze".
    A key whose freeze was refused is not auto-frozen again (each cold boot would pay a failed
    dump); the operator's forced freeze tries again."""
    if done:
        return FreezeDecision(Action.REPLAY, f"command {cmd.id} was already handled")
    if cmd.force:
        return FreezeDecision(Action.FREEZE, "forced by the operator")
    if refused is not None:
        since = format_time(refused.since)
        return FreezeDecision(
            Action.SKIP,
            f"{refused.line()} (since {since}, {refused.failures} failed);"
            " `snapscale freeze` tries again, a new spec starts clean",
        )
    if catalog is not None:
        return FreezeDecision(
            Action.SKIP,
            f"catalog already has checkpoint {catalog.checkpoint_id} for this key"
            f" (from {catalog.host or 'an unknown host'})",
            checkpoint_id=catalog.checkpoint_id,
        )
    return None


def judge_claim(existing: Claim | None, *, host: str, command_id: str, now: float) -> ClaimVerdict:
    if existing is None:
        return ClaimVerdict.CREATE
    if existing.host == host and existing.command_id == command_id:
        return ClaimVerdict.OURS
    if existing.expires_at <= now:
        return ClaimVerdict.TAKE
    return ClaimVerdict.HELD


def after_claim(verdict: ClaimVerdict, existing: Claim | None) -> FreezeDecision:
    if verdict is ClaimVerdict.HELD:
        assert existing is not None
        return FreezeDecision(
            Action.SKIP, f"host {existing.host} is freezing this key (command {existing.command_id})"
        )
    return FreezeDecision(Action.FREEZE, "claimed the deployment + compat key")
