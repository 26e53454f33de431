"""The policy against Knative's decider semantics: tables of (observed stable and panic concurrency,
current replicas, knobs, prior panic state) -> (desired, panic), each row checked on snapscale's
`decide` and on the reference model of Knative's rules (`knative_ref.py`), so a row that one
side gets wrong fails. Rows marked "Knative test" are that case of knative/serving's own
pkg/autoscaler/scaling/autoscaler_test.go, restated in snapscale's terms.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import pytest
from knative_ref import Decider, MaxWindow
from scaler_scenarios import knative_spec

from snapscale.scaler.policy import activation, decide
from snapscale.scaler.window import BUCKET_S, Window
from snapscale.shared.bus.spec import DeploymentSpec, ScalingSpec, spec_from_mapping
from snapscale.shared.core import wire
from snapscale.shared.core.errors import ConfigError

# target 1 x utilization 1: desired == ceil(concurrency); Knative's default windows and rates
K = ScalingSpec(target_concurrency=1.0, utilization=1.0, max_replicas=100_000, scale_to_zero_after_s=0.0)
K10 = replace(K, target_concurrency=10.0, max_scale_up_rate=10.0)  # newTestAutoscaler's target and up rate
K10_DOWN = replace(K10, max_scale_down_rate=10.0)
K10_ACT2 = replace(K10, activation_scale=2)
K_ACT3 = replace(K, activation_scale=3)
NOW = 10_000.5  # mid-second: no sample in `now`'s own bucket, so the windows end at the second before


def observed(spec: ScalingSpec, stable: float, panic: float) -> Window:
    """A window whose stable and panic averages at NOW are exactly `stable` and `panic`."""
    ns = math.ceil(spec.stable_window_s / BUCKET_S)
    np_ = math.ceil(spec.panic_window_s / BUCKET_S)
    rest = (stable * ns - panic * np_) / (ns - np_)
    assert rest >= 0, "not reachable with full windows"
    w = Window(spec, NOW - 1000.0)
    last = int(NOW // BUCKET_S) - 1
    traffic = 1 if stable > 0 or panic > 0 else 0
    for b in range(last - ns + 1, last + 1):
        w.record(b + 0.5, panic if b > last - np_ else rest, traffic)
    return w


def reference(spec: ScalingSpec) -> Decider:
    """Knative's decider with the same knobs (min, max and grace are the reconciler's, unused here)."""
    return Decider(knative_spec(spec, BUCKET_S))


Prior = tuple[float, int] | None  # (seconds since the panic threshold was last met, high-water mark)

ROWS: list[tuple[str, ScalingSpec, float, float, int, Prior, tuple[int, bool]]] = [
    ("stable, no change (Knative test)", K, 5, 5, 5, None, (5, False)),
    ("stable decrease bounded by the down rate (Knative test)", K10_DOWN, 1, 1, 100, None, (10, False)),
    ("up rate bounds a panic (Knative test)", K10, 1000, 1001, 1, None, (10, True)),
    ("zero replicas count as one (Knative test)", K10, 1000, 888, 0, None, (10, True)),
    ("zero replicas, a desire of 2 panics", K, 2, 2, 0, None, (2, True)),
    ("zero replicas, a desire of 1 does not", K, 1, 1, 0, None, (1, False)),
    ("in panic a larger stable desire wins (Knative test)", K, 50, 30, 5, (5.0, 5), (50, True)),
    ("in panic a larger panic desire wins (Knative test)", K, 20, 30, 5, (5.0, 5), (30, True)),
    ("in panic never below the high-water mark", K, 2, 3, 10, (5.0, 10), (10, True)),
    ("panic tested before the up rate", replace(K, max_scale_up_rate=1.5), 2, 10, 2, None, (3, True)),
    ("a small up rate still adds one (Knative test)", replace(K, max_scale_up_rate=1.1), 3, 3.1, 2, None,
     (3, True)),
    ("below the threshold no panic", K, 4, 7, 4, None, (4, False)),
    ("panic holds a stable window to the tick", K, 2, 2, 4, (60.0, 4), (4, True)),
    ("panic ends once the stable window has strictly passed", K, 2, 2, 4, (60.5, 4), (2, False)),
    ("panic extended while the threshold is met (Knative test)", K, 30, 80, 40, (30.0, 25), (80, True)),
    ("activation scale raises a desire above zero (Knative test)", K10_ACT2, 1, 0, 0, None, (2, False)),
    ("activation scale does not wake a deployment with no desire", K_ACT3, 0, 0, 0, None, (0, False)),
    ("stable mode with no traffic goes to zero (Knative test)", K, 0, 0, 1, None, (0, False)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "spec", "stable", "panic", "current", "prior", "want"), ROWS, ids=[r[0] for r in ROWS]
)
def test_decide_table(
    name: str,
    spec: ScalingSpec,
    stable: float,
    panic: float,
    current: int,
    prior: Prior,
    want: tuple[int, bool],
) -> None:
    w = observed(spec, stable, panic)
    assert w.averages() == pytest.approx((stable, panic))
    ref = reference(spec)
    if prior is not None:
        ago, high = prior
        w.start_panic(NOW - ago, spec.stable_window_s)
        w.max_panic = high
        ref.panic_time, ref.max_panic_pods = NOW - ago, high
    d = decide(w, spec, current, NOW)
    assert (d.desired, d.panic) == want, f"snapscale: {name}"
    assert ref.scale(NOW, current, stable, panic) == want, f"Knative reference: {name}"


def test_scale_down_delay_as_knative_tests_it() -> None:
    """Knative's TestAutoscalerScaleDownDelay ("simple", then "gradual"): delay 5 min, target 10,
    rates 10, panic threshold 100; short windows so that each level fills them."""
    spec = replace(
        K,
        target_concurrency=10.0,
        stable_window_s=6.0,
        panic_window_s=1.0,
        max_scale_up_rate=10.0,
        max_scale_down_rate=10.0,
        panic_threshold=100.0,
        scale_down_delay_s=300.0,
    )
    ref = reference(spec)
    w = Window(spec, -1000.0)
    level = 0.0
    current = 0
    t_last = 0.0

    def at(t: float, concurrency: float) -> int:
        nonlocal level, current, t_last
        for s in range(int(t_last), int(t)):  # a sample a second; the new level fills the windows
            c = level if s < t - 7 else concurrency
            w.record(s + 0.5, c, 1 if c > 0 else 0)
        level, t_last = concurrency, t
        d = decide(w, spec, current, t)
        got_ref, _ = ref.scale(t, current, concurrency, concurrency)
        assert d.desired == got_ref, t
        current = d.desired
        return d.desired

    assert at(10, 40) == 4
    assert at(300, 0) == 4  # less than the delay at reduced concurrency
    assert at(312, 0) == 0  # the delay after the last 4: down
    assert at(540, 40) == 4
    assert at(600, 30) == 4  # 4 still dominates
    assert at(660, 0) == 4
    assert at(840, 0) == 3  # the 4 scrolls out; the 3 decided at 600 is the highest left
    assert at(900, 0) == 0


def test_scale_down_delay_zero_goes_down_at_once() -> None:
    """Knative's TestAutoscalerScaleDownDelayZero: no delay window, no hold within a bucket."""
    spec = replace(K, target_concurrency=10.0, max_scale_down_rate=10.0, panic_threshold=100.0)
    assert decide(observed(spec, 40, 40), spec, 0, NOW).desired == 4
    assert decide(observed(spec, 20, 20), spec, 4, NOW + 0.4).desired == 2


def test_the_delay_window_is_knatives() -> None:
    """Window.hold and the reference's port of max.window agree on a long random walk."""
    import random

    rng = random.Random(18)
    w = Window(K, 0.0)
    ref = MaxWindow(7.0, 1.0)
    t = 0.0
    for _ in range(2000):
        t += rng.choice([0.3, 0.5, 1.0, 2.0, 9.0])
        v = rng.randint(0, 12)
        ref.record(t, v)
        assert w.hold(t, v, 7.0) == ref.current(), t


def test_activation_leaves_its_decision_behind() -> None:
    """A scale from zero sized on one sample: the tick that follows, whose bucket averages lower
    (the queue drained within the second), does not take back what is still restoring."""
    w = Window(K, 0.0)
    w.record(100.1, 50.0, 1)
    n = activation(w, K, 0, 50.0, 1, 100.1)
    assert n == 50
    for at in (100.3, 100.5, 100.7, 100.9):
        w.record(at, 10.0, 1)
    d = decide(w, K, n, 101.2)  # the bucket's mean is 18: without the panic, max(25, 18) = 25
    assert (d.desired, d.panic, d.reason) == (50, True, "panic")


def test_activation_scale_and_up_rate_bound_an_activation() -> None:
    w = Window(K, 0.0)
    assert activation(w, replace(K, activation_scale=4), 0, 1.0, 1, 1.0) == 4
    assert activation(Window(K, 0.0), replace(K, max_scale_up_rate=2.0), 0, 50.0, 1, 1.0) == 2
    w = Window(K, 0.0)
    assert activation(w, K, 0, 1.0, 1, 1.0) == 1
    assert w.panic_since is None  # a desire of 1 at zero is not twice one


def test_grace_from_inactive_counts_from_when_the_decision_reached_zero() -> None:
    spec = replace(K, stable_window_s=10.0, panic_window_s=1.0, scale_to_zero_after_s=5.0)
    # the sample at 0.5 leaves the 10 s stable window at 11.0: the decision reaches zero then
    cases: tuple[tuple[Literal["last-traffic", "inactive"], float], ...] = (
        ("last-traffic", 11.0),
        ("inactive", 16.0),
    )
    for grace_from, zero_at in cases:
        s = replace(spec, scale_to_zero_grace_from=grace_from)
        w = Window(s, -1000.0)
        w.record(0.5, 1.0, 1)
        got = [(k / 2, decide(w, s, 1, k / 2).desired) for k in range(2, 40)]
        first_zero = next(t for t, n in got if n == 0)
        assert first_zero == zero_at, grace_from


def test_grace_from_inactive_starts_nothing_for_a_new_deployment() -> None:
    spec = replace(K, scale_to_zero_grace_from="inactive", scale_to_zero_after_s=30.0)
    assert decide(Window(spec, -1000.0), spec, 0, 0.0).desired == 0


def test_grace_from_inactive_places_again_a_replica_lost_within_it() -> None:
    spec = replace(K, stable_window_s=10.0, panic_window_s=1.0, scale_to_zero_after_s=5.0)
    spec = replace(spec, scale_to_zero_grace_from="inactive")
    w = Window(spec, -1000.0)
    w.record(0.5, 1.0, 1)
    assert decide(w, spec, 1, 5.0).desired == 1
    assert decide(w, spec, 1, 11.0).desired == 1  # inactive since 11.0
    assert decide(w, spec, 0, 13.0).desired == 1  # its host died: back within the grace
    assert decide(w, spec, 0, 16.0).desired == 0


@pytest.mark.parametrize(
    ("knobs", "problem"),
    [
        ({"scale_down_delay_s": -1.0}, "scaling.scale_down_delay_s: must be at least 0 and at most 3600 s"),
        ({"scale_down_delay_s": 3601.0}, "scaling.scale_down_delay_s: must be at least 0 and at most 3600 s"),
        ({"scale_down_delay_s": float("nan")}, "scaling.scale_down_delay_s"),
        ({"activation_scale": 0}, "scaling.activation_scale: must be at least 1"),
        ({"activation_scale": 3, "min_replicas": 4, "max_replicas": 10}, "below min_replicas 4"),
        ({"activation_scale": 11, "max_replicas": 10}, "above max_replicas 10"),
        ({"scale_to_zero_grace_from": "never"}, "scaling.scale_to_zero_grace_from: must be one of"),
    ],
)
def test_new_knobs_are_validated(knobs: dict[str, object], problem: str) -> None:
    plain = wire.to_plain(DeploymentSpec(name="d", command=["x"]))
    plain["scaling"].update(knobs)
    with pytest.raises(ConfigError) as e:
        spec_from_mapping(plain)
    assert problem in str(e.value)


def test_new_knobs_have_defaults_that_keep_the_old_behaviour() -> None:
    s = ScalingSpec()
    assert (s.scale_down_delay_s, s.activation_scale, s.scale_to_zero_grace_from) == (0.0, 1, "last-traffic")
    assert s.problems() == []
    # a removed deployment is drained with max_replicas 0: that must not trip the activation check
    assert replace(s, activation_scale=3, max_replicas=0).problems() == []
