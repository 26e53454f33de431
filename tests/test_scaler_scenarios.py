"""Scenarios on virtual time (tests/scaler_scenarios.py): snapscale's policy beside Knative's rules
(the reference model in tests/knative_ref.py), both deciding every second.

What must hold in every scenario: snapscale restores and releases no more replicas than Knative's
rules do, and reaches zero within a tick of them. Each scenario also pins its own numbers (the
table in docs/scaling.md), so a change of behaviour shows up here first.
"""

from __future__ import annotations

import pytest
from scaler_scenarios import SCENARIOS, Outcome, Scenario, compare

# name prefix -> snapscale's (changes, restores, releases, zero after s or None), Knative's (1 s tick)
PINNED: dict[str, tuple[tuple[int, int, int, float | None], tuple[int, int, int, float | None]]] = {
    "burst from zero": ((7, 29, 0, None), (8, 29, 0, None)),
    "200 at once after 10 min idle": ((1, 29, 0, None), (8, 29, 0, None)),
    "50 for 5 min, then none; grace from last traffic": ((9, 8, 8, 60.0), (13, 8, 8, 61.0)),
    "50 for 5 min, then none; grace from inactive": ((9, 8, 8, 90.0), (13, 8, 8, 90.0)),
    "the same with a scale-down delay of 30 s": ((9, 8, 8, 154.0), (13, 8, 8, 154.0)),
    "10 to 18 in flight": ((10, 7, 4, None), (12, 7, 5, None)),
    "the same with a scale-down delay of 90 s": ((2, 3, 0, None), (3, 3, 0, None)),
    "12 in flight, 4 s spikes": ((9, 10, 8, None), (11, 11, 9, None)),
}


def _numbers(o: Outcome, sc: Scenario) -> tuple[int, int, int, float | None]:
    zero = None if sc.stop_s is None or o.zero_at is None else round(o.zero_at - sc.stop_s, 1)
    return o.changes, o.restores, o.releases, zero


@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc.name for sc in SCENARIOS])
def test_scenario(sc: Scenario) -> None:
    snap, knative, _ = compare(sc)
    # every decision that changed the count could be carried out: none asked to release
    # replicas that were still restoring
    assert snap.decisions == snap.changes
    assert snap.restores <= knative.restores
    assert snap.releases <= knative.releases
    assert snap.peak <= knative.peak
    if sc.stop_s is not None:
        assert snap.zero_at is not None and knative.zero_at is not None
        assert abs(snap.zero_at - knative.zero_at) <= 1.0
    pinned = [v for k, v in PINNED.items() if sc.name.startswith(k)]
    assert len(pinned) == 1, sc.name
    assert (_numbers(snap, sc), _numbers(knative, sc)) == pinned[0]


def test_every_scenario_is_pinned() -> None:
    assert len(PINNED) == len(SCENARIOS)


def test_a_burst_after_idle_places_once_and_releases_nothing() -> None:
    """The case issue 18 reported: the tick after an activation read the idle seconds into its
    averages and released half of what was still restoring, then panic placed them again."""
    sc = next(s for s in SCENARIOS if s.name.startswith("200 at once after"))
    snap, _, _ = compare(sc)
    assert (snap.changes, snap.restores, snap.releases) == (1, 29, 0)


def test_panic_enters_as_often_as_under_knatives_rules() -> None:
    sc = next(s for s in SCENARIOS if s.name.startswith("12 in flight, 4 s spikes"))
    snap, knative, _ = compare(sc)
    assert snap.panics == knative.panics == 5  # every spike to 28 (5 in 15 min), none to 24
