"""The span of one scaling decision: a child of the traffic event that woke the deployment from
zero (an activation), else a new trace that links to the latest traffic's, so a long-lived
deployment's decisions do not pile into one trace. Attributes: what was decided and why.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.trace import Link

from snapscale.scaler.policy import ScaleDecision
from snapscale.shared.core import telemetry

tracer = telemetry.tracer("snapscale.scaler")


def decision_span(
    traffic_headers: Mapping[str, str] | None,
    dep: str,
    what: str,
    d: ScaleDecision | None,
    current: int,
    child_of_traffic: bool,
) -> trace.Span:
    """Start (not enter) the `scaler.decision` span; `traffic_headers` carry the traffic's trace."""
    ctx = telemetry.extract(traffic_headers) if traffic_headers else None
    parent = ctx if child_of_traffic else None
    links = []
    if ctx is not None and not child_of_traffic:
        sc = trace.get_current_span(ctx).get_span_context()
        if sc.is_valid:
            links.append(Link(sc))
    attrs: dict[str, str | int | float | bool] = {
        "snapscale.deployment": dep,
        "snapscale.scale.what": what,
        "snapscale.scale.current": current,
    }
    if d is not None:
        attrs.update(
            {
                "snapscale.scale.desired": d.desired,
                "snapscale.scale.panic": d.panic,
                "snapscale.scale.stable_avg": d.stable_avg,
                "snapscale.scale.panic_avg": d.panic_avg,
                "snapscale.scale.reason": d.reason,
            }
        )
    return tracer.start_span("scaler.decision", context=parent, links=links, attributes=attrs)
