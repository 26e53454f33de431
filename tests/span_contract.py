"""The span names and attributes that Grafana's dashboard and the demo's trace test rely on.

One place, so they can be checked against the restorer's docs/restorer.md and its code; nothing
here is imported by snapscale itself.
"""

from __future__ import annotations

# Root span of one scale-up (restorer side), carrying the tier it took and why not a faster one.
SCALE_UP_SPAN = "scale_up"
TIER_ATTR = "snapscale.tier"
DEPLOYMENT_ATTR = "snapscale.deployment"
REPLICA_ATTR = "snapscale.replica"
FALLBACK_ATTR = "fallback.reason"

# The scaler's span per decision that sent commands; the scale-up trace continues it.
DECISION_SPAN = "scaler.decision"
# What `snapscale traffic` wraps each traffic event it publishes in.
TRAFFIC_SPAN = "traffic"
# The gateway's span per request; a request that finds no replica publishes the activation inside it.
REQUEST_SPAN = "gateway.request"

# Phases of a restore, in order; a cold boot's phases.
RESTORE_PHASES = (
    "lookup", "prefetch", "materialize", "criu_restore", "cuda_restore", "after_restore", "ready_probe"
)  # fmt: skip
COLD_PHASES = ("launch", "ready_probe")
PHASE_SPANS = tuple(dict.fromkeys(RESTORE_PHASES + COLD_PHASES))
# The phases every restore of a CPU sandbox without hooks shows (no CUDA, no hook).
RESTORE_TRACE_PHASES = ("lookup", "prefetch", "materialize", "criu_restore")

# Attributes on the prefetch span.
PREFETCH_BYTES_ATTR = "prefetch.bytes"
PREFETCH_CACHED_CHUNKS_ATTR = "prefetch.cached_chunks"
PREFETCH_CACHED_BYTES_ATTR = "prefetch.cached_bytes"

# The restorer's background prefetch (a prefetch command at scale-to-zero): not a scale-up phase.
BACKGROUND_PREFETCH_SPAN = "prefetch.background"

# The restorer's metrics (snapscale/restorer/metrics.py), their attributes, and the names
# Prometheus gives them (`.` -> `_`, the unit appended: s -> _seconds, By -> _bytes, counters _total).
SCALE_UP_DURATION_METRIC = "snapscale.scale_up.duration"
SCALE_UP_DURATION_LABELS = frozenset({"snapscale.tier", "snapscale.deployment"})
PHASE_DURATION_METRIC = "snapscale.scale_up.phase.duration"
PHASE_DURATION_LABELS = frozenset({"snapscale.phase", "snapscale.tier"})
SCALE_UP_IO_METRIC = "snapscale.scale_up.io"
SCALE_UP_IO_LABELS = frozenset({"snapscale.source"})
PROMETHEUS_METRICS = {
    "snapscale_scale_up_duration_seconds": SCALE_UP_DURATION_LABELS,
    "snapscale_scale_up_phase_duration_seconds": PHASE_DURATION_LABELS,
    "snapscale_scale_up_io_bytes_total": SCALE_UP_IO_LABELS,
}
# Second-scale histogram boundaries (snapscale.shared.core.telemetry.DURATION_BUCKETS_S).
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)

SPAN_NAMES = frozenset(
    {SCALE_UP_SPAN, DECISION_SPAN, TRAFFIC_SPAN, REQUEST_SPAN, BACKGROUND_PREFETCH_SPAN, *PHASE_SPANS}
)
ATTRIBUTES = frozenset(
    {
        TIER_ATTR,
        DEPLOYMENT_ATTR,
        REPLICA_ATTR,
        FALLBACK_ATTR,
        PREFETCH_BYTES_ATTR,
        PREFETCH_CACHED_CHUNKS_ATTR,
        PREFETCH_CACHED_BYTES_ATTR,
    }
)
