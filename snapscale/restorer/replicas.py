"""The replicas this restorer runs, keeps suspended or is bringing up: the state of its host that
changes with every command. In memory only; a restart rebuilds it from the sandbox registry.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from snapscale.shared.bus import DeploymentSpec, ReplicaState, ReplicaSummary, Tier
from snapscale.shared.engine import Sandbox


@dataclass
class Live:
    """A sandbox this restorer runs (ready) or keeps (suspended)."""

    spec: DeploymentSpec
    sandbox: Sandbox
    state: ReplicaState
    tier: Tier | None
    since: float
    checkpoint_id: str | None = None
    rss_bytes: int = 0  # measured when suspended

    def summary(self) -> ReplicaSummary:
        return ReplicaSummary(
            deployment=self.spec.name,
            replica=self.sandbox.replica,
            state=self.state,
            gpu_uuids=list(self.sandbox.gpu_uuids),
            since=self.since,
            rss_bytes=self.rss_bytes,
        )


@dataclass
class Replicas:
    live: dict[str, Live] = field(default_factory=dict)
    # replica -> its scale-up in progress, so a release can cancel it and a duplicate can wait
    starting: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    cancelled_by_release: set[str] = field(default_factory=set)  # else a cancel means shutdown

    def suspended_of(self, deployment: str) -> list[str]:
        """Suspended replicas of `deployment`, the most recently suspended first (warmest pages)."""
        s = [
            lv
            for lv in self.live.values()
            if lv.spec.name == deployment and lv.state is ReplicaState.SUSPENDED
        ]
        return [lv.sandbox.replica for lv in sorted(s, key=lambda lv: -lv.since)]
