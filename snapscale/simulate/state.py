"""What the simulator tracks per deployment and replica, and its timed events' kinds."""

from __future__ import annotations

from dataclasses import dataclass, field

from snapscale.freezer.decide import Claim
from snapscale.restorer.tiers import Candidate
from snapscale.scaler.window import Window
from snapscale.shared.bus import DeploymentSpec, ReplicaEvent

WAKE, READY, FROZEN, PREFETCHED = range(4)  # the timed events' kinds (resumes: `Sim.resumes`)


@dataclass
class Rep:
    host: str
    gpus: list[str]
    start: float
    tier: str
    ev: ReplicaEvent | None = None  # set once ready


@dataclass
class Dep:
    spec: DeploymentSpec
    gib: float
    nbytes: int
    window: Window | None = None
    live: dict[str, Rep] = field(default_factory=dict)
    n_ready: int = 0
    noready_since: float = 0.0
    cursor: int = 0
    ckpt: str | None = None
    claim: Claim | None = None
    freeze_deadline: float | None = None  # the scaler holds the last replica for a freeze till then
    freeze_done: bool = False
    resume_at: float | None = None  # asleep with replicas: the tick that decides it next
    peak: int = 0
    entry: Candidate | None = None  # the catalog entry of `ckpt` as the restorer reads it
