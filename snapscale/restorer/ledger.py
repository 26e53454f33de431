"""The restorer's crash-safe record of the commands it took on, so a command id is handled once.

One small JSON file per command id under the state dir, written atomically (tmp, fsync, rename).
An entry not marked done after a restart marks work a crash cut short.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError
from snapscale.shared.core.fsutil import write_atomic

log = logging.getLogger(__name__)
LEDGER_TYPE = "restorer-command"


@dataclass(frozen=True)
class Entry:
    id: str
    verb: str
    deployment: str
    replica: str
    started_at: float
    done: bool = False
    ok: bool = False
    outcome: str = ""  # the final state and reason, for a duplicate's log line
    run_dir: str = ""  # where a restore's sandbox lives, to clean up after a crash
    extra: dict[str, str] = field(default_factory=dict)


class Ledger:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, command_id: str) -> Path:
        # ids come off the wire: name files by a digest so no id can escape the directory
        return self.root / f"{hashlib.sha256(command_id.encode()).hexdigest()[:40]}.json"

    def get(self, command_id: str) -> Entry | None:
        p = self._path(command_id)
        try:
            return wire.decode(p.read_bytes(), Entry, LEDGER_TYPE)
        except FileNotFoundError:
            return None
        except MessageError as e:
            log.error("ledger entry %s unreadable (%s); treating the command as new", p, e)
            return None

    def start(self, entry: Entry) -> None:
        write_atomic(self._path(entry.id), wire.encode(entry, LEDGER_TYPE))

    def finish(self, command_id: str, *, ok: bool, outcome: str) -> Entry | None:
        e = self.get(command_id)
        if e is None:
            return None
        done = replace(e, done=True, ok=ok, outcome=outcome)
        write_atomic(self._path(command_id), wire.encode(done, LEDGER_TYPE))
        return done

    def unfinished(self) -> list[Entry]:
        out: list[Entry] = []
        for p in sorted(self.root.glob("*.json")):
            try:
                e = wire.decode(p.read_bytes(), Entry, LEDGER_TYPE)
            except (OSError, MessageError) as err:
                log.error("ledger entry %s unreadable: %s", p, err)
                continue
            if not e.done:
                out.append(e)
        return out

    def prune(self, older_than: float) -> int:
        """Drop finished entries started before `older_than` (the command stream forgets them too)."""
        n = 0
        for p in self.root.glob("*.json"):
            try:
                e = wire.decode(p.read_bytes(), Entry, LEDGER_TYPE)
            except (OSError, MessageError):
                continue
            if e.done and e.started_at < older_than:
                p.unlink(missing_ok=True)
                n += 1
        return n
