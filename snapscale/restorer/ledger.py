"""The restorer's crash-safe record of the commands it took on, so a command id is handled once.

Stored by the bus's `Ledger` (a file per command id, written atomically); what is here is what an
entry means. An entry not marked done after a restart marks work a crash cut short.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from snapscale.shared import bus
from snapscale.shared.bus import Id, Name, OptId

LEDGER_TYPE = "restorer-command"


@dataclass(frozen=True)
class Entry:
    """Its ids are held to the limits of the command they came from: one that is not is quarantined
    when read, never replayed into a subject, a KV key or a path."""

    id: Id
    verb: str
    deployment: Name
    replica: OptId  # "" for a prefetch
    started_at: float
    done: bool = False
    ok: bool = False
    outcome: str = ""  # the final state and reason, for a duplicate's log line
    run_dir: str = ""  # where a restore's sandbox lives, for a person: a replay derives it from the ids
    extra: dict[str, str] = field(default_factory=dict)


class Ledger:
    """The commands of one restorer; an unreadable entry counts as a new command."""

    def __init__(self, root: Path) -> None:
        self.entries = bus.Ledger(root, Entry, LEDGER_TYPE)

    def get(self, command_id: str) -> Entry | None:
        return self.entries.get(command_id)

    def start(self, entry: Entry) -> None:
        self.entries.put(entry.id, entry)

    def finish(self, command_id: str, *, ok: bool, outcome: str) -> Entry | None:
        e = self.entries.get(command_id)
        if e is None:
            return None
        done = replace(e, done=True, ok=ok, outcome=outcome)
        self.entries.put(command_id, done)
        return done

    def quarantine(self, command_id: str, why: str) -> None:
        """Move an entry that cannot be replayed aside, for a person; the restorer goes on."""
        self.entries.quarantine(command_id, why)

    def unfinished(self) -> list[Entry]:
        return [e for e in self.entries.records() if not e.done]

    def prune(self, older_than: float) -> int:
        """Drop finished entries started before `older_than` (the command stream forgets them too)."""
        return len(self.entries.prune(lambda e: e.done and e.started_at < older_than))
