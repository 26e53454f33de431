"""The freezer's crash-safe local record of commands: attempts in flight and outcomes done.

Two of the bus's `Ledger`s (a file per command id, written atomically), so a restart knows what it
was doing and a redelivered command is answered from here instead of frozen twice; plus the staging
dirs attempts freeze into. No freezing logic.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from snapscale.shared import bus
from snapscale.shared.bus import ID_MAX, CheckpointEvent, Id, Name, OptId, check_token

log = logging.getLogger(__name__)

ATTEMPT_TYPE = "freeze-attempt"


class Phase(StrEnum):
    """How far an attempt got; each phase's output is durable before the next one starts."""

    FREEZING = "freezing"  # staging dir may hold a partial image: throw it away
    DUMPED = "dumped"  # staging dir holds a complete image: upload it, do not freeze again
    UPLOADED = "uploaded"  # chunks and the signed manifest are in the store
    CATALOGED = "cataloged"  # the catalog entry points at it: only the event is left


@dataclass(frozen=True)
class Attempt:
    """Its ids are held to the limits of the command they came from: a record that is not is
    quarantined when read, never resumed into a path or a KV key."""

    command_id: Id
    deployment: Name
    replica: Id
    checkpoint_id: Id
    staging_dir: str  # for a person: the freezer derives it from `checkpoint_id`
    phase: Phase
    started_at: float
    keep_running: bool = True
    compat: dict[str, str] = field(default_factory=dict)
    compat_hash: OptId = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    manifest_key: str = ""
    previous_id: Id | None = None

    def advance(self, phase: Phase, **changes: object) -> Attempt:
        return replace(self, phase=phase, **changes)  # type: ignore[arg-type]


class Ledger:
    """`<state_dir>/freezer/{inflight,done,staging}`; one instance per freezer process."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "freezer"
        self.inflight_dir = self.root / "inflight"
        self.done_dir = self.root / "done"
        self.staging_root = self.root / "staging"
        self.staging_root.mkdir(parents=True, exist_ok=True)
        self._attempts = bus.Ledger(self.inflight_dir, Attempt, ATTEMPT_TYPE)
        self._outcomes = bus.Ledger(self.done_dir, CheckpointEvent, CheckpointEvent.TYPE)

    def staging_dir(self, checkpoint_id: str) -> Path:
        """Built from a validated id only (raises ValueError for any other): never a path outside."""
        return self.staging_root / check_token("checkpoint id", checkpoint_id, ID_MAX)

    # --- attempts ----------------------------------------------------------------
    def attempt(self, command_id: str) -> Attempt | None:
        """The attempt in flight for `command_id`; None (start over) if none or unreadable."""
        return self._attempts.get(command_id)

    def save(self, a: Attempt) -> None:
        self._attempts.put(a.command_id, a)

    def attempts(self) -> list[Attempt]:
        return self._attempts.records()

    def drop_staging(self, checkpoint_id: str) -> None:
        shutil.rmtree(self.staging_dir(checkpoint_id), ignore_errors=True)

    # --- outcomes ----------------------------------------------------------------
    def outcome(self, command_id: str) -> CheckpointEvent | None:
        return self._outcomes.get(command_id)

    def finish(self, command_id: str, event: CheckpointEvent, checkpoint_id: str | None = None) -> None:
        """Record the outcome first, then forget the attempt and its staging dir (in that order:
        a crash in between leaves a done command with leftovers, never a lost outcome)."""
        self._outcomes.put(command_id, event)
        self._attempts.drop(command_id)
        if checkpoint_id:
            self.drop_staging(checkpoint_id)

    # --- housekeeping ------------------------------------------------------------
    def sweep(self, *, now: float | None = None, done_max_age_s: float = 3 * 24 * 3600) -> list[str]:
        """At start: drop staging dirs no attempt can resume, and attempts and outcomes older than
        any redelivery (the command stream keeps a day). Returns the staging dirs removed."""
        t = time.time() if now is None else now
        for a in self._attempts.prune(lambda a: t - a.started_at > done_max_age_s):
            log.warning(
                "abandoning freeze %s of %s: its command never came back", a.checkpoint_id, a.deployment
            )
        resumable = {a.checkpoint_id for a in self.attempts() if a.phase is not Phase.FREEZING}
        removed: list[str] = []
        for d in self.staging_root.iterdir():
            if d.name not in resumable:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        self._outcomes.prune(lambda ev: t - ev.ts > done_max_age_s)
        return removed
