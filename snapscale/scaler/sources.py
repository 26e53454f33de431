"""Traffic from several gateways: each one reports the requests it holds in flight and queued for a
deployment, so the deployment's concurrency is the sum of the latest report of every gateway.

Averaging the reports instead (what the window did with every sample before) halves the load two
gateways see and scales to half the replicas. Pure: time is a parameter, nothing here does I/O.
"""

from __future__ import annotations

STALE_S = 3.0  # a gateway reports at least once a second while it has traffic, and once more at zero


class TrafficSources:
    """The latest concurrency each source (a gateway's id) reported, per deployment.

    A source silent for `stale_s` (a gateway that died, or left without its last zero report)
    drops out of the sum, so its last word does not hold replicas up for ever.
    """

    def __init__(self, stale_s: float = STALE_S) -> None:
        self.stale_s = stale_s
        self._latest: dict[str, dict[str, tuple[float, float]]] = {}

    def observe(self, deployment: str, source: str, concurrency: float, now: float) -> float:
        """Record `source`'s report received at `now`; returns the deployment's summed concurrency."""
        if not concurrency > 0:  # negative or NaN is not a measurement
            concurrency = 0.0
        per = self._latest.setdefault(deployment, {})
        per[source] = (now, concurrency)
        total = 0.0
        for src, (seen, value) in list(per.items()):
            if now - seen > self.stale_s:
                del per[src]
            else:
                total += value
        return total
