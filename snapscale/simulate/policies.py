"""The policies one run compares, and what each run measured.

Every policy but always-on runs the scaler's own decider with the spec knobs below; they differ in
the grace before zero, the tiers a scale-up may take, suspend or stop, freezing, and prefetch.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from snapscale.shared.bus import Tier

ALL_TIERS = frozenset(Tier)
COLD_ONLY = frozenset({Tier.COLD})


@dataclass(frozen=True)
class Policy:
    name: str
    scale_to_zero_after_s: float
    tiers: frozenset[Tier]
    release_mode: Literal["auto", "stop", "suspend"]
    freeze: bool  # auto-freeze after a cold boot, and freeze before the last replica goes
    prefetch_hosts: int  # hosts warmed at scale to zero (ScalerConfig.prefetch_hosts)
    label: str


ALWAYS_ON = "always-on"
POLICIES: tuple[Policy, ...] = (
    Policy("keepalive-10m", 600.0, COLD_ONLY, "stop", False, 0, "keep-alive 10 min, cold boots"),
    Policy("keepalive-20m", 1200.0, COLD_ONLY, "stop", False, 0, "keep-alive 20 min, cold boots"),
    Policy("zero-cold", 30.0, COLD_ONLY, "stop", False, 0, "scale to zero, cold boot only (Knative/KEDA)"),
    Policy("tiers", 30.0, ALL_TIERS, "auto", True, 0, "snapscale tiers"),
    Policy("tiers-prefetch", 30.0, ALL_TIERS, "auto", True, 2, "snapscale tiers + prefetch at zero"),
)
NAMES = (ALWAYS_ON, *(p.name for p in POLICIES))


@dataclass
class Result:
    policy: str
    label: str
    gpu_s: float = 0.0
    waits: array[float] = field(default_factory=lambda: array("d"))  # requests that found no ready replica
    timeouts: int = 0  # of those, waited past the gateway's queue timeout (a 503)
    restores: Counter[str] = field(default_factory=Counter)  # resume, hot, cache, store, cold
    freezes: int = 0
    prefetches: int = 0
    store_bytes: int = 0
    unplaceable: int = 0  # replicas the fleet had no GPU for when asked
    decisions: int = 0
    events: int = 0
    wall_s: float = 0.0
    peak_gpus: int = 0
    peaks: list[int] = field(default_factory=list)  # per deployment, its most live replicas
    series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # sampled: (t, live)

    @property
    def cache_hit_rate(self) -> float | None:
        """Of the restores from a checkpoint, the share the host cache served."""
        r = self.restores
        n = r["hot"] + r["cache"] + r["store"]
        return (r["hot"] + r["cache"]) / n if n else None
