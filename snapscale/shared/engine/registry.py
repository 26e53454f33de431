"""The one crash-safe local record of this host's sandboxes: one JSON file per replica.

Writes are atomic (tmp + fsync + rename + dir fsync), so a crash leaves the old record or the new one.
The restorer writes it; the freezer reads it. It records, it never starts or stops anything.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from snapscale.shared.core.fsutil import write_atomic
from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.sandbox import Sandbox

log = logging.getLogger(__name__)

_REPLICA = re.compile(r"^[A-Za-z0-9_-]+$")


class SandboxRegistry:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "sandboxes"

    def _path(self, replica: str) -> Path:
        # The replica id becomes a file name: refuse anything that could leave the directory.
        if not _REPLICA.match(replica):
            raise EngineError("registry", f"replica {replica!r} must match [A-Za-z0-9_-]+")
        return self.dir / f"{replica}.json"

    def put(self, sb: Sandbox) -> None:
        write_atomic(self._path(sb.replica), sb.to_json(), mode=0o600)

    def get(self, replica: str) -> Sandbox | None:
        return self._read(self._path(replica))

    def remove(self, replica: str) -> None:
        self._path(replica).unlink(missing_ok=True)

    def all(self) -> list[Sandbox]:
        if not self.dir.exists():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            sb = self._read(p)
            if sb is not None:
                out.append(sb)
        return out

    def _read(self, path: Path) -> Sandbox | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Sandbox.from_dict(json.loads(data))
        except (ValueError, EngineError) as e:
            # Keep the bad file for an operator; skipping it must not hide the others.
            log.error("sandbox record %s is unreadable, ignored: %s", path, e)
            return None
