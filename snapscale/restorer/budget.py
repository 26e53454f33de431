"""The suspend RAM budget: which suspended replicas to stop so the rest fit. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suspended:
    replica: str
    since: float  # when it was suspended
    rss_bytes: int


def over_budget(suspended: list[Suspended], budget_bytes: int) -> list[str]:
    """The replicas to stop, oldest first, until the others fit in `budget_bytes`."""
    total = sum(s.rss_bytes for s in suspended)
    out: list[str] = []
    for s in sorted(suspended, key=lambda s: (s.since, s.replica)):
        if total <= budget_bytes:
            break
        out.append(s.replica)
        total -= s.rss_bytes
    return out
