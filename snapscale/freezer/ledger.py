"""The freezer's crash-safe local record of commands: attempts in flight and outcomes done.

One JSON file per command id (atomic tmp + fsync + rename), so a restart knows what it was doing
and a redelivered command is answered from here instead of frozen twice. No freezing logic.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from snapscale.shared.bus import CheckpointEvent, decode_message, encode_message
from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError
from snapscale.shared.core.fsutil import write_atomic

log = logging.getLogger(__name__)

ATTEMPT_TYPE = "freeze-attempt"
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class Phase(StrEnum):
    """How far an attempt got; each phase's output is durable before the next one starts."""

    FREEZING = "freezing"  # staging dir may hold a partial image: throw it away
    DUMPED = "dumped"  # staging dir holds a complete image: upload it, do not freeze again
    UPLOADED = "uploaded"  # chunks and the signed manifest are in the store
    CATALOGED = "cataloged"  # the catalog entry points at it: only the event is left


@dataclass(frozen=True)
class Attempt:
    command_id: str
    deployment: str
    replica: str
    checkpoint_id: str
    staging_dir: str
    phase: Phase
    started_at: float
    keep_running: bool = True
    compat: dict[str, str] = field(default_factory=dict)
    compat_hash: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    manifest_key: str = ""
    previous_id: str | None = None

    def advance(self, phase: Phase, **changes: object) -> Attempt:
        return replace(self, phase=phase, **changes)  # type: ignore[arg-type]


def _name(command_id: str) -> str:
    # ids come off the wire: never let one pick a path
    if _SAFE.match(command_id):
        return command_id
    return "h-" + hashlib.sha256(command_id.encode()).hexdigest()[:40]


class Ledger:
    """`<state_dir>/freezer/{inflight,done,staging}`; one instance per freezer process."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "freezer"
        self.inflight_dir = self.root / "inflight"
        self.done_dir = self.root / "done"
        self.staging_root = self.root / "staging"
        for d in (self.inflight_dir, self.done_dir, self.staging_root):
            d.mkdir(parents=True, exist_ok=True)

    def staging_dir(self, checkpoint_id: str) -> Path:
        return self.staging_root / checkpoint_id

    # --- attempts ----------------------------------------------------------------
    def attempt(self, command_id: str) -> Attempt | None:
        p = self.inflight_dir / f"{_name(command_id)}.json"
        try:
            return wire.decode(p.read_bytes(), Attempt, ATTEMPT_TYPE)
        except FileNotFoundError:
            return None
        except MessageError as e:
            log.warning("attempt record %s unreadable (%s): starting over", p, e)
            return None

    def save(self, a: Attempt) -> None:
        write_atomic(self.inflight_dir / f"{_name(a.command_id)}.json", wire.encode(a, ATTEMPT_TYPE))

    def attempts(self) -> list[Attempt]:
        out = []
        for p in sorted(self.inflight_dir.glob("*.json")):
            try:
                out.append(wire.decode(p.read_bytes(), Attempt, ATTEMPT_TYPE))
            except (OSError, MessageError) as e:
                log.warning("attempt record %s unreadable (%s)", p, e)
        return out

    def drop_staging(self, checkpoint_id: str) -> None:
        shutil.rmtree(self.staging_dir(checkpoint_id), ignore_errors=True)

    # --- outcomes ----------------------------------------------------------------
    def outcome(self, command_id: str) -> CheckpointEvent | None:
        p = self.done_dir / f"{_name(command_id)}.json"
        try:
            return decode_message(p.read_bytes(), CheckpointEvent)
        except FileNotFoundError:
            return None
        except MessageError as e:
            log.warning("outcome record %s unreadable (%s)", p, e)
            return None

    def finish(self, command_id: str, event: CheckpointEvent, checkpoint_id: str | None = None) -> None:
        """Record the outcome first, then forget the attempt and its staging dir (in that order:
        a crash in between leaves a done command with leftovers, never a lost outcome)."""
        write_atomic(self.done_dir / f"{_name(command_id)}.json", encode_message(event))
        (self.inflight_dir / f"{_name(command_id)}.json").unlink(missing_ok=True)
        if checkpoint_id:
            self.drop_staging(checkpoint_id)

    # --- housekeeping ------------------------------------------------------------
    def sweep(self, *, now: float | None = None, done_max_age_s: float = 3 * 24 * 3600) -> list[str]:
        """At start: drop staging dirs no attempt can resume, and attempts and outcomes older than
        any redelivery (the command stream keeps a day). Returns the staging dirs removed."""
        t = time.time() if now is None else now
        for a in self.attempts():
            if t - a.started_at > done_max_age_s:
                log.warning(
                    "abandoning freeze %s of %s: its command never came back", a.checkpoint_id, a.deployment
                )
                (self.inflight_dir / f"{_name(a.command_id)}.json").unlink(missing_ok=True)
        resumable = {a.checkpoint_id for a in self.attempts() if a.phase is not Phase.FREEZING}
        removed: list[str] = []
        for d in self.staging_root.iterdir():
            if d.name not in resumable:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        for p in self.done_dir.glob("*.json"):
            try:
                if t - p.stat().st_mtime > done_max_age_s:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        return removed
