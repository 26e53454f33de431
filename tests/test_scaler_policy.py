"""The KPA-like policy over fake time: tables of traffic samples and ticks, no sleeping."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from snapscale.scaler.policy import ScaleDecision, activation, decide
from snapscale.scaler.window import Window
from snapscale.shared.bus.spec import ScalingSpec

# target 1 x utilization 1.0: desired == ceil(concurrency), which keeps the tables readable
BASE = ScalingSpec(
    target_concurrency=1.0,
    utilization=1.0,
    stable_window_s=10.0,
    panic_window_s=2.0,
    panic_threshold=2.0,
    max_scale_up_rate=1000.0,
    max_scale_down_rate=2.0,
    min_replicas=0,
    max_replicas=100,
    scale_to_zero_after_s=5.0,
)


def play(
    spec: ScalingSpec, samples: dict[float, float], ticks: list[float], start: int = 0, t0: float = -100.0
) -> list[ScaleDecision]:
    """Feed samples (time -> concurrency) and decide at each tick, carrying `current` forward."""
    w = Window(spec, t0)
    current = start
    out: list[ScaleDecision] = []
    events = sorted(samples.items())
    i = 0
    for t in ticks:
        while i < len(events) and events[i][0] <= t:
            w.record(events[i][0], events[i][1], arrivals=1 if events[i][1] > 0 else 0)
            i += 1
        d = decide(w, spec, current, t)
        out.append(d)
        current = d.desired
    return out


def steady(c: float, t_from: float, t_to: float, step: float = 0.5) -> dict[float, float]:
    n = int((t_to - t_from) / step)
    return {t_from + k * step: c for k in range(n)}


@pytest.mark.parametrize(
    ("name", "spec", "samples", "ticks", "start", "want"),
    [
        ("idle stays at zero", BASE, {}, [0, 1, 2], 0, [0, 0, 0]),
        ("steady 3 in flight", BASE, steady(3, 0, 20), [19.9], 3, [3]),
        (
            "utilization leaves headroom",
            replace(BASE, utilization=0.7, target_concurrency=2.0),
            steady(7, 0, 20),
            [19.9],
            5,
            [5],  # ceil(7 / 1.4)
        ),
        ("max_replicas caps", replace(BASE, max_replicas=4), steady(9, 0, 20), [19.9], 4, [4]),
        ("min_replicas floors", replace(BASE, min_replicas=2), {}, [1, 2], 2, [2, 2]),
        (
            "scale-down limited to /2 per tick",
            BASE,
            {**steady(16, -100, -80), **steady(1, -80, 40)},
            [30.0, 31.0, 32.0, 33.0, 34.0],
            16,
            [8, 4, 2, 1, 1],
        ),
        (
            "scale-up limited by rate",
            replace(BASE, max_scale_up_rate=2.0),
            steady(20, 0, 40),
            [12.0, 13.0, 14.0, 15.0],
            1,
            [2, 4, 8, 16],
        ),
    ],
)
def test_policy_table(
    name: str, spec: ScalingSpec, samples: dict[float, float], ticks: list[float], start: int, want: list[int]
) -> None:
    got = [d.desired for d in play(spec, samples, ticks, start)]
    assert got == want, name


def test_burst_enters_panic_and_never_scales_down_in_it() -> None:
    spec = BASE
    w = Window(spec, -100.0)
    for t in range(-20, 0):
        w.record(float(t), 2.0)
    d = decide(w, spec, 2, 0.0)
    assert (d.desired, d.panic) == (2, False)
    # a burst: 10 in flight for one second; the panic window sees it at once, the stable one barely
    w.record(0.2, 10.0)
    w.record(0.6, 10.0)
    d = decide(w, spec, 2, 0.9)
    assert d.panic
    assert d.desired == 6  # panic avg (2 + 10) / 2 buckets; the stable avg alone says 3
    assert d.stable_avg < d.panic_avg
    # the burst ends; within a stable window of the last panic the count holds at its high-water mark
    for at in (1.5, 2.5, 3.5, 4.5):
        w.record(at, 2.0)
        d = decide(w, spec, 6, at + 0.1)
        assert (d.desired, d.panic) == (6, True), at
    # a stable window (10 s) after the last over-threshold tick, panic ends and scale-down resumes
    for t in range(5, 12):
        w.record(float(t), 2.0)
    d = decide(w, spec, 6, 11.0)
    assert not d.panic
    assert d.desired == 3  # bounded by max_scale_down_rate 2.0


def test_panic_needs_threshold() -> None:
    w = Window(BASE, -100.0)
    for t in range(-20, 0):
        w.record(float(t), 4.0)
    w.record(0.5, 7.0)  # panic avg 5.5 over seen buckets < 2 x 4
    d = decide(w, BASE, 4, 0.9)
    assert not d.panic


def test_scale_to_zero_only_after_grace() -> None:
    spec = replace(BASE, stable_window_s=2.0, panic_window_s=1.0, scale_to_zero_after_s=6.0)
    w = Window(spec, -100.0)
    w.record(0.0, 1.0, arrivals=1)
    w.record(0.5, 0.0)
    got = {t: decide(w, spec, 1, t).desired for t in (1.0, 3.0, 5.9)}
    assert got == {1.0: 1, 3.0: 1, 5.9: 1}  # window already empty at 3.0, grace holds the replica
    d = decide(w, spec, 1, 6.0)
    assert (d.desired, d.reason) == (0, "stable")
    # traffic again resets the grace
    w.record(7.0, 1.0, arrivals=1)
    assert decide(w, spec, 1, 12.9).desired == 1
    assert decide(w, spec, 1, 13.0).desired == 0


def test_a_replica_lost_within_the_grace_comes_back() -> None:
    spec = replace(BASE, stable_window_s=2.0, panic_window_s=1.0, scale_to_zero_after_s=10.0)
    w = Window(spec, -100.0)
    w.record(0.0, 1.0, arrivals=1)
    assert decide(w, spec, 0, 5.0).desired == 1  # its host died at 4 s: place it again
    assert decide(w, spec, 0, 10.0).desired == 0  # past the grace: zero is right


def test_restart_holds_scale_down_for_a_stable_window() -> None:
    spec = replace(BASE, stable_window_s=10.0, scale_to_zero_after_s=0.0)
    w = Window(spec, 100.0)  # the scaler started at 100 and found 6 replicas in KV
    d = decide(w, spec, 6, 101.0)
    assert (d.desired, d.reason) == (6, "warming-up")
    assert decide(w, spec, 6, 109.9).desired == 6
    assert decide(w, spec, 6, 110.0).desired == 3  # then the ordinary /2 rate applies


def act(spec: ScalingSpec, current: int, concurrency: float, arrivals: int) -> int:
    return activation(Window(spec, 0.0), spec, current, concurrency, arrivals, 0.5)


def test_activation_is_immediate_and_bounded() -> None:
    assert act(BASE, 0, 0.0, 1) == 1
    assert act(BASE, 0, 5.0, 0) == 5  # a queue that already holds five
    assert act(replace(BASE, max_replicas=3), 0, 50.0, 9) == 3
    assert act(BASE, 1, 5.0, 3) == 0  # replicas exist: the tick handles it
    assert act(BASE, 0, 0.0, 0) == 0  # an empty report is no traffic
    assert act(BASE, 0, float("nan"), 0) == 0  # nor is one that measured nothing
    assert act(replace(BASE, max_replicas=0), 0, 1.0, 1) == 0  # disabled deployment


def test_activation_needs_zero_ticks() -> None:
    """The first event alone decides; the same event then keeps the replica through the next tick."""
    w = Window(BASE, 0.0)
    w.record(0.01, 1.0, arrivals=1)
    assert activation(w, BASE, 0, 1.0, 1, 0.01) == 1
    assert decide(w, BASE, 1, 0.5).desired == 1


def test_out_of_order_and_bad_samples() -> None:
    w = Window(BASE, 0.0)
    w.record(5.0, 4.0)
    w.record(4.2, 4.0)  # late, still inside both windows
    w.record(-50.0, 100.0)  # older than the stable window: ignored
    w.record(5.05, 1.0)
    for bad in (float("nan"), float("inf"), -3.0, 1.7e308):  # no measurement: refused, not counted
        assert w.record(5.1, bad) is False
    assert w.record(5.2, 1.0, arrivals=-1) is False
    stable, panic = w.averages()
    assert stable == pytest.approx((4.0 + 2.5) / 2)
    assert panic == pytest.approx(stable)


def test_an_absurd_sample_leaves_the_window_scaling() -> None:
    """1.7e308 twice in one bucket made the sums inf, then NaN: decide raised or said nothing, for
    good. Refused, it leaves the window as it was, and normal traffic scales as ever."""
    w = Window(BASE, 0.0)
    for t in (0.1, 0.2):
        assert w.record(t, 1.7e308) is False
    assert w.averages() == (0.0, 0.0)
    for t in range(1, 12):
        assert w.record(t + 0.5, 3.0 * BASE.target_concurrency * BASE.utilization) is True
    d = decide(w, BASE, 1, 12.0)
    assert math.isfinite(d.stable_avg) and d.desired == 3


def test_window_drops_old_buckets_exactly() -> None:
    w = Window(BASE, 0.0)
    for t in range(30):
        w.record(t + 0.5, float(t % 7))
    w.advance(1000.0)
    assert w.averages() == (0.0, 0.0)
    assert w.stable_sum == 0.0
    w.record(1000.5, 3.0)
    # the first traffic after a whole stable window without any starts both windows again
    # (Knative's buckets after a gap); before issue 18 this read (0.3, 1.5), diluted by idle seconds
    assert w.averages() == (3.0, 3.0)


def test_a_gap_shorter_than_the_stable_window_counts_as_zeros() -> None:
    w = Window(BASE, 0.0)
    for t in range(6):
        w.record(t + 0.5, 1.0, arrivals=1)
    w.record(12.5, 4.0, arrivals=1)  # 7 s after the last traffic: seconds 6..11 read as zero load
    stable, panic = w.averages()
    assert stable == pytest.approx((3 * 1.0 + 4.0) / 10)
    assert panic == pytest.approx(4.0 / 2)
    w.record(22.5, 4.0, arrivals=1)  # 10 s, a whole stable window, after it: a fresh start
    assert w.averages() == (4.0, 4.0)


def test_a_second_just_begun_is_not_zero_load() -> None:
    """Deciding right after a bucket boundary, before the new second's first sample, holds steady."""
    spec = replace(BASE, stable_window_s=2.0, panic_window_s=1.0)
    w = Window(spec, 0.0)
    got = []
    for k in range(1, 60):
        t = k * 0.1 + 0.05
        w.record(t, 3.0, arrivals=1)
        got.append(decide(w, spec, 3, t + 0.06).desired)  # x.95 + 0.06: a new second, no sample yet
    assert set(got) == {3}
