"""The scaler's own settings (beside the shared `Settings`): its tick, lease and timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScalerConfig:
    tick_s: float = 1.0
    lease_s: float = 3.0
    freeze_timeout_s: float = 120.0  # the last replica is released anyway after this
    host_timeout_floor_s: float = 3.0  # a host is lost after max(3 heartbeat intervals, this)
    avoid_s: float = 60.0  # a host that failed a deployment's replica is skipped for it this long
    prefetch_hosts: int = 2
    release_timeout_s: float = 300.0  # a release its host never answers is forgotten after this
