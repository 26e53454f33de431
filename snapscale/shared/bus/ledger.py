"""A crash-safe local record per command id: what a service took on and how far it got, so a
redelivered command is recognised after a restart and handled once. Services keep their own
record types and what the records mean; this module only stores them.

One JSON file per command id, named by a digest of it (ids come off the wire: none may pick a
path), written atomically. A record that cannot be read (not JSON, or outside its type's declared
limits) is moved aside to `quarantine/` with a log line and taken as absent, and so is one its
service cannot replay (`quarantine`): a bad file never stops a service, nor is it read again at
every start; it only costs the work that record would have saved, and stays for a person.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError
from snapscale.shared.core.fsutil import write_atomic

log = logging.getLogger(__name__)

R = TypeVar("R")


def _name(command_id: str) -> str:
    return f"{hashlib.sha256(command_id.encode()).hexdigest()[:40]}.json"


class Ledger(Generic[R]):
    """Records of type `cls` (a frozen dataclass) under `root`, on the wire as `type_name`."""

    def __init__(self, root: Path, cls: type[R], type_name: str) -> None:
        self.root = root
        self.cls = cls
        self.type_name = type_name
        root.mkdir(parents=True, exist_ok=True)

    def get(self, command_id: str) -> R | None:
        """The record of `command_id`; None when there is none or it cannot be read."""
        return self._read(self.root / _name(command_id))

    def put(self, command_id: str, record: R) -> None:
        write_atomic(self.root / _name(command_id), wire.encode(record, self.type_name))

    def drop(self, command_id: str) -> None:
        (self.root / _name(command_id)).unlink(missing_ok=True)

    def quarantine(self, command_id: str, why: str) -> None:
        """Move the record of `command_id` aside (its service cannot replay it), saying why."""
        self._move_aside(self.root / _name(command_id), why)

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    def records(self) -> list[R]:
        """Every readable record, in the order of their file names."""
        return [r for _, r in self._scan()]

    def prune(self, stale: Callable[[R], bool]) -> list[R]:
        """Drop the records `stale` picks; returns them. Unreadable ones are left for a person."""
        dropped: list[R] = []
        for p, r in self._scan():
            if stale(r):
                p.unlink(missing_ok=True)
                dropped.append(r)
        return dropped

    def _scan(self) -> Iterator[tuple[Path, R]]:
        for p in sorted(self.root.glob("*.json")):
            r = self._read(p)
            if r is not None:
                yield p, r

    def _read(self, p: Path) -> R | None:
        try:
            return wire.decode(p.read_bytes(), self.cls, self.type_name)
        except FileNotFoundError:  # never written, or dropped meanwhile
            return None
        except OSError as e:  # a disk problem: leave the file where it is
            log.warning("ledger record %s unreadable (%s): taken as absent", p, e)
            return None
        except MessageError as e:
            self._move_aside(p, str(e))
            return None

    def _move_aside(self, p: Path, why: str) -> None:
        target = self.quarantine_dir / p.name
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            os.replace(p, target)
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("ledger record %s: %s; could not move it aside either (%s)", p, why, e)
            return
        log.error("ledger record %s quarantined as %s: %s", p.name, target, why)
