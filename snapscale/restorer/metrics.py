"""The restorer's metrics: what an operator graphs without a trace backend. The Prometheus panels
of compose/grafana/dashboards/snapscale.json read exactly these.

Names and units after the OpenTelemetry semantic conventions: the unit is the instrument's, never
part of its name (Prometheus appends `_seconds`, `_bytes`, `_total` itself, so a `_s` in the name
came out as `_s_seconds`); attributes carry the span attributes' names, so a panel and a trace
say `snapscale.tier` alike. Durations get second-scale buckets from telemetry's view.
"""

from __future__ import annotations

from collections.abc import Mapping

from snapscale.shared.bus import Tier
from snapscale.shared.core import telemetry

SCALE_UP_DURATION = "snapscale.scale_up.duration"  # Prometheus: snapscale_scale_up_duration_seconds
PHASE_DURATION = "snapscale.scale_up.phase.duration"  # snapscale_scale_up_phase_duration_seconds
SCALE_UP_IO = "snapscale.scale_up.io"  # snapscale_scale_up_io_bytes_total
TIER_ATTR = "snapscale.tier"
DEPLOYMENT_ATTR = "snapscale.deployment"
PHASE_ATTR = "snapscale.phase"
SOURCE_ATTR = "snapscale.source"  # where a scale-up's image bytes came from: store or cache

# The phases of a scale-up (the span names of scaleup.py); other timings are not phases.
PHASES = (
    "lookup", "prefetch", "materialize", "criu_restore", "cuda_restore", "after_restore", "ready_probe",
    "launch",
)  # fmt: skip

_meter = telemetry.meter("snapscale.restorer")
_duration = _meter.create_histogram(
    SCALE_UP_DURATION, unit="s", description="scale-up command received -> replica ready, by tier"
)
_phase = _meter.create_histogram(PHASE_DURATION, unit="s", description="one phase of a scale-up, by tier")


# Both sources at 0 from the first scrape on, so the first scale-up's bytes show in `increase()`.
_io = telemetry.observable_totals(
    _meter, SCALE_UP_IO, SOURCE_ATTR, unit="By", description="image bytes scale-ups read, by source",
    keys=("store", "cache"),
)  # fmt: skip


def record_ready(
    tier: Tier, deployment: str, total_s: float, timings_s: Mapping[str, float], nbytes: Mapping[str, int]
) -> None:
    """One scale-up reached ready: its time to ready, its phases and where its bytes came from.

    Bytes joined from another scale-up's download are that one's: counted once, as fetched."""
    _duration.record(total_s, {TIER_ATTR: tier.value, DEPLOYMENT_ATTR: deployment})
    for name, secs in timings_s.items():
        if name in PHASES:
            _phase.record(secs, {PHASE_ATTR: name, TIER_ATTR: tier.value})
    _io.add("store", nbytes.get("fetched", 0))
    _io.add("cache", nbytes.get("cached", 0))
