"""The restorer's metrics: what an operator graphs without a trace backend. The Prometheus panels
of compose/grafana/dashboards/snapscale.json read exactly these.

Names and units after the OpenTelemetry semantic conventions: the unit is the instrument's, never
part of its name (Prometheus appends `_seconds`, `_bytes`, `_total` itself, so a `_s` in the name
came out as `_s_seconds`); attributes carry the span attributes' names, so a panel and a trace
say `snapscale.tier` alike. Durations get second-scale buckets from telemetry's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Observation

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


class _IoTotals:
    """Bytes of images that scale-ups read, by source, since the process started.

    An observable counter rather than `add()`: it reports both sources from the first scrape on,
    at 0, so the first scale-up's bytes show in `increase()`; Prometheus cannot see the first
    increment of a series that appears with it."""

    def __init__(self) -> None:
        self.by_source = {"store": 0, "cache": 0}

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {SOURCE_ATTR: src}) for src, n in self.by_source.items()]


_io = _IoTotals()
_meter.create_observable_counter(
    SCALE_UP_IO, callbacks=[_io.observe], unit="By", description="image bytes scale-ups read, by source"
)


def record_ready(
    tier: Tier, deployment: str, total_s: float, timings_s: Mapping[str, float], nbytes: Mapping[str, int]
) -> None:
    """One scale-up reached ready: its time to ready, its phases and where its bytes came from.

    Bytes joined from another scale-up's download are that one's: counted once, as fetched."""
    _duration.record(total_s, {TIER_ATTR: tier.value, DEPLOYMENT_ATTR: deployment})
    for name, secs in timings_s.items():
        if name in PHASES:
            _phase.record(secs, {PHASE_ATTR: name, TIER_ATTR: tier.value})
    _io.by_source["store"] += nbytes.get("fetched", 0)
    _io.by_source["cache"] += nbytes.get("cached", 0)
