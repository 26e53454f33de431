"""The restorer's hold on its host: the tools it opened at start (bus, store, cache, CRIU, slots,
ledger, registry), which never change while it runs, beside the replicas, which change with every
command. Owns no loop and starts nothing.

A function takes `HostTools` when it only talks to the bus, store or engine, and `Host` (both
halves) when it also reads or changes which replicas live here.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapscale.restorer.checkpoints import Checkpoints
from snapscale.restorer.compat import CompatKeys
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.forwarding import Forwards
from snapscale.restorer.hot import HotImages
from snapscale.restorer.ledger import Ledger
from snapscale.restorer.replicas import Replicas
from snapscale.restorer.slots import Slots
from snapscale.restorer.standby import Fillers
from snapscale.shared.bus import ID_MAX, Bus, check_token
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import CriuBinary, SandboxRegistry


@dataclass(frozen=True)
class HostTools:
    """What the restorer opened at start, fixed for its run (the objects keep their own state)."""

    settings: Settings
    config: RestorerConfig
    bus: Bus
    criu: CriuBinary
    compat: CompatKeys
    slots: Slots
    ledger: Ledger
    registry: SandboxRegistry
    checkpoints: Checkpoints
    forwards: Forwards  # host ports forwarded to the sandboxes (none without an advertise address)
    hot: HotImages | None = None  # assembled images kept for the next restore of the same checkpoint
    fillers: Fillers | None = None  # weights fillers by GPU (SNAPSCALE_WEIGHTS_FILL=host)
    started_at: float = field(default_factory=time.time)  # in every heartbeat: a restart shows

    @property
    def name(self) -> str:
        return self.config.host

    @property
    def work_dir(self) -> Path:
        return self.config.dirs(self.settings)

    def run_dir(self, replica: str, command_id: str) -> Path:
        """`<work>/run/<replica>.<digest of the command id>`. Built from validated ids only (raises
        ValueError for any other), and checked to be a folder of `<work>/run`: whatever reaches
        here (a command, a ledger entry), a replica id never picks a path."""
        check_token("replica", replica, ID_MAX)
        check_token("command id", command_id, ID_MAX)
        tag = hashlib.sha256(command_id.encode()).hexdigest()[:10]
        return _child(self.work_dir / "run", f"{replica}.{tag}")

    def attempt_dir(self, run_dir: str) -> Path | None:
        """The per-attempt folder under `<work>/run/` holding `run_dir`, or None if elsewhere."""
        root = self.work_dir / "run"
        try:
            rel = Path(run_dir).relative_to(root)
        except ValueError:
            return None
        return root / rel.parts[0] if rel.parts else None

    def image_dir(self, replica: str, command_id: str) -> Path:
        """Where a restore assembles its image: named as its run dir, checked the same way."""
        return _child(self.config.images_root(self.settings), self.run_dir(replica, command_id).name)

    def now(self) -> float:
        return time.time()


def _child(root: Path, name: str) -> Path:
    p = root / name
    if p.parent != root or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a folder name under {root}")
    return p


@dataclass(frozen=True)
class Host:
    """Both halves, for the work that acts on replicas with the tools (scale-up, release, adoption)."""

    tools: HostTools
    replicas: Replicas
