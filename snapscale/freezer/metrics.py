"""The freezer's metrics (Prometheus through telemetry's exporter, as the restorer's metrics.py).

`snapscale.freeze.failures` (Prometheus: `snapscale_freeze_failures_total`) counts freezes that
failed on the workload, by their named reason (engine.refusal: tcp-connection,
external-unix-socket, before-freeze, ...), so a panel shows which deployments' contents keep
snapshots from being made.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Observation

from snapscale.shared.core import telemetry

FREEZE_FAILURES = "snapscale.freeze.failures"
REASON_ATTR = "snapscale.reason"

_meter = telemetry.meter("snapscale.freezer")


class _Failures:
    """Failed freezes by reason since the process started: an observable counter, so a reason's
    series exists from its first failure on (the restorer's _IoTotals explains why)."""

    def __init__(self) -> None:
        self.by_reason: dict[str, int] = {}

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {REASON_ATTR: r}) for r, n in sorted(self.by_reason.items())]


failures = _Failures()
_meter.create_observable_counter(
    FREEZE_FAILURES, callbacks=[failures.observe], unit="{freeze}", description="failed freezes, by reason"
)


def record_failure(reason: str) -> None:
    failures.by_reason[reason] = failures.by_reason.get(reason, 0) + 1
