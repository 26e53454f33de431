"""The freezer's metrics (Prometheus through telemetry's exporter, as the restorer's metrics.py).

`snapscale.freeze.failures` (Prometheus: `snapscale_freeze_failures_total`) counts freezes that
failed on the workload, by their named reason (engine.refusal: tcp-connection,
external-unix-socket, before-freeze, ...), so a panel shows which deployments' contents keep
snapshots from being made.
"""

from __future__ import annotations

from snapscale.shared.core import telemetry

FREEZE_FAILURES = "snapscale.freeze.failures"
REASON_ATTR = "snapscale.reason"

_meter = telemetry.meter("snapscale.freezer")
# A reason's series exists from its first failure on (telemetry.Totals).
failures = telemetry.observable_totals(
    _meter, FREEZE_FAILURES, REASON_ATTR, unit="{freeze}", description="failed freezes, by reason"
)


def record_failure(reason: str) -> None:
    failures.add(reason)
