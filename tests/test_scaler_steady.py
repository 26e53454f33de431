"""`steady_until` against `decide`: skipping the decisions it says cannot change changes nothing."""

from __future__ import annotations

import math
import random

import pytest

from snapscale.scaler.policy import activation, decide, steady_until
from snapscale.scaler.window import Window
from snapscale.shared.bus.spec import ScalingSpec


def _spec(rnd: random.Random) -> ScalingSpec:
    return ScalingSpec(
        target_concurrency=rnd.choice([1.0, 2.0, 0.5]),
        utilization=rnd.choice([0.7, 1.0]),
        stable_window_s=rnd.choice([10.0, 20.0]),
        panic_window_s=rnd.choice([2.0, 4.0]),
        max_scale_down_rate=2.0,
        max_replicas=rnd.choice([3, 100]),
        activation_scale=rnd.choice([1, 1, 3]),
        scale_to_zero_after_s=rnd.choice([3.0, 8.0, 30.0]),
        scale_to_zero_grace_from=rnd.choice(["last-traffic", "inactive"]),
    )


def _traffic(rnd: random.Random, horizon: float) -> list[tuple[float, float]]:
    """Bursts of samples with gaps between, some of them zero (a report of no requests)."""
    out: list[tuple[float, float]] = []
    t = rnd.uniform(0, 5)
    while t < horizon:
        for _ in range(rnd.randrange(1, 12)):
            out.append((t, rnd.choice([0.0, rnd.uniform(0.01, 1.0), rnd.uniform(1, 9)])))
            t += rnd.uniform(0.2, 1.5)
        t += rnd.expovariate(1 / 15)
    return out


def _first_tick(at: float, tick: float) -> int:
    k = math.ceil(at / tick)
    while (k - 1) * tick >= at:
        k -= 1
    return k


def _play(
    spec: ScalingSpec, traffic: list[tuple[float, float]], tick: float, n: int, skip: bool
) -> tuple[dict[int, int], int]:
    """Tick k at k * tick: record the samples before it, decide, act (current = desired); with
    `skip`, a tick before `steady_until` and before the next sample's tick is not decided.
    Returns the replica count after every tick (a skipped tick keeps it) and the decisions made."""
    w = Window(spec, 0.0)
    current, i, resume, decided = 0, 0, 0, 0
    out: dict[int, int] = {}
    for k in range(1, n):
        t = k * tick
        if k < resume and not (i < len(traffic) and traffic[i][0] < t):
            out[k] = current
            continue
        while i < len(traffic) and traffic[i][0] < t:
            at, conc = traffic[i]
            w.record(at, conc, 1 if conc > 0 else 0)
            if current == 0:  # the service's scale from zero on a traffic event
                current = activation(w, spec, current, conc, 1 if conc > 0 else 0, at) or current
            i += 1
        d = decide(w, spec, current, t)
        decided += 1
        if skip:
            until = steady_until(w, spec, current, d, t)
            assert until >= t
            resume = _first_tick(until, tick) if until < math.inf else n
        current = d.desired
        out[k] = current
    return out, decided


def test_skipping_what_steady_until_rules_out_decides_the_same() -> None:
    rnd = random.Random(5)
    every_n = skip_n = 0
    for _ in range(300):
        spec = _spec(rnd)
        tick = rnd.choice([1.0, 0.5, 2.0, 0.3])
        n = int(150 / tick)
        traffic = _traffic(rnd, 120.0)
        every, a = _play(spec, traffic, tick, n, skip=False)
        skipping, b = _play(spec, traffic, tick, n, skip=True)
        assert skipping == every
        every_n, skip_n = every_n + a, skip_n + b
    assert skip_n < every_n / 2  # no no-op: most ticks need no decision


def test_steady_until_answers_now_when_a_scale_is_due_or_a_delay_is_kept() -> None:
    spec = ScalingSpec(utilization=1.0, stable_window_s=10.0)
    w = Window(spec, 0.0)
    w.record(0.5, 3.0, 1)
    d = decide(w, spec, 1, 2.0)
    assert d.desired == 2 and steady_until(w, spec, 1, d, 2.0) == 2.0
    delayed = ScalingSpec(utilization=1.0, stable_window_s=10.0, scale_down_delay_s=5.0)
    w = Window(delayed, 0.0)
    w.record(0.5, 1.0, 1)
    d = decide(w, delayed, 1, 2.0)
    assert d.desired == 1 and steady_until(w, delayed, 1, d, 2.0) == 2.0


def test_steady_until_a_lone_sample_holds_one_replica_until_it_leaves_the_window() -> None:
    """One 0.5 sample in bucket 3 of a 10 s window, grace past: one replica until the bucket
    leaves (a decision at 14 reads buckets 4..13), then the desire falls to zero."""
    spec = ScalingSpec(utilization=1.0, stable_window_s=10.0, panic_window_s=1.0, scale_to_zero_after_s=1.0)
    w = Window(spec, 0.0)
    w.record(3.5, 0.5, 1)
    d = decide(w, spec, 1, 9.0)
    assert (d.desired, d.reason) == (1, "stable")
    assert steady_until(w, spec, 1, d, 9.0) == 14.0
    assert decide(w, spec, 1, 13.9).desired == 1 and decide(w, spec, 1, 14.0).desired == 0


def _walked_stable_until(w: Window, per_replica: float, want: int) -> float:
    """`Window.stable_until` as round 3 had it: the ring's stamps sorted, each stretch between
    two expiries walked second by second. The reference the production function must equal."""
    s, h, first = w.stable_sum, w.head, w.first_bucket
    if first is None or (s == 0.0 and want == 0):
        return math.inf if want == 0 else (h + 2) * 1.0
    ns, sums, cnts = w.n_stable, w._sum, w._cnt

    def desire(s: float, h: int) -> int:
        seen = h - first + 1
        return math.ceil(s / (ns if seen > ns else seen) / per_replica - 1e-9) if s > 0 else 0

    for j in sorted([j for j in w._stamp if h - ns < j <= h]):
        gone = j + ns
        if gone - 1 > h and desire(s, gone - 1) != want:
            while desire(s, h + 1) == want:
                h += 1
            return (h + 2) * 1.0
        s -= sums[j % ns] / cnts[j % ns]
        h = gone
        if s < 1e-6 or desire(s, h) != want:
            break
    return (h + 1) * 1.0


def test_stable_until_equals_the_second_by_second_walk() -> None:
    """On random windows (young ones, where dilution moves the desire, and full ones), at random
    decision times: the bisecting, unsorted `stable_until` answers what the walk answered."""
    rnd = random.Random(11)
    bisected = 0
    for _ in range(400):
        spec = _spec(rnd)
        w = Window(spec, 0.0)
        t = rnd.uniform(0, 30)
        for _ in range(rnd.randrange(1, 40)):
            w.record(t, rnd.choice([0.0, rnd.uniform(0.01, 1.0), rnd.uniform(1, 40)]), 1)
            t += rnd.choice([0.3, 1.0, rnd.uniform(0, 25)])
        for _ in range(3):
            d = decide(w, spec, 1, t)
            per = spec.target_concurrency * spec.utilization
            want = math.ceil(d.stable_avg / per - 1e-9) if d.stable_avg > 0 else 0
            got = w.stable_until(per, want)
            assert got == _walked_stable_until(w, per, want)
            bisected += w.first_bucket is not None and got < math.inf and got - w.head > 2
            t += rnd.uniform(0, 8)
    assert bisected > 50  # the stretches inside a window were reached, not only the ends


def test_the_window_sums_equal_a_recount_across_gaps() -> None:
    """The running sums after random samples and gaps (within a panic window, within the stable
    one, longer: the ring is not cleared, its stale stamps must never count) equal the sums
    recounted from the samples themselves."""
    rnd = random.Random(12)
    for _ in range(200):
        spec = _spec(rnd)
        w = Window(spec, 0.0)
        ns, np_ = w.n_stable, w.n_panic
        seen: dict[int, list[float]] = {}
        t = 0.0
        for _ in range(rnd.randrange(5, 120)):
            t += rnd.choice([0.4, 1.0, rnd.uniform(1, np_ + 2), rnd.uniform(ns - 2, 3 * ns)])
            c = rnd.choice([0.0, rnd.uniform(0.01, 9)])
            w.record(t, c, 1 if c > 0 else 0)
            seen.setdefault(int(t), []).append(c)
            if rnd.random() < 0.3:
                t += rnd.uniform(0, ns + 3)
                decide(w, spec, 1, t)
            for n, got in ((ns, w.stable_sum), (np_, w.panic_sum)):
                want = sum(sum(v) / len(v) for b, v in seen.items() if w.head - n < b <= w.head)
                assert got == pytest.approx(want, abs=1e-6)
