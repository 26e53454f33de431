"""The autoscaling policy: Knative-KPA desired replica counts from observed concurrency.

Follows Knative's decider (knative/serving pkg/autoscaler/scaling/autoscaler.go) rule for rule
where docs/scaling.md gives a Knative name; the deliberate differences are listed there.
Pure: time is a parameter, nothing sleeps or does I/O. A `Window` (window.py) is the only thing
mutated, in O(1) per traffic sample; `decide` is O(1) amortised, so one core makes >100k decisions/s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from snapscale.scaler.window import BUCKET_S, MAX_ARRIVALS, Window
from snapscale.shared.bus import MAX_CONCURRENCY, ScalingSpec


def sample_problem(concurrency: float, arrivals: int) -> str | None:
    """Why a traffic sample is no measurement (non-finite, negative or absurd); None when it is one."""
    if not (math.isfinite(concurrency) and 0 <= concurrency <= MAX_CONCURRENCY):
        return f"concurrency must be a number within [0, {MAX_CONCURRENCY:g}], got {concurrency:g}"
    if not 0 <= arrivals <= MAX_ARRIVALS:
        return f"arrivals must be within [0, {MAX_ARRIVALS:g}], got {arrivals:g}"
    return None


class ScaleDecision(NamedTuple):
    desired: int
    panic: bool
    stable_avg: float
    panic_avg: float
    reason: str  # which rule settled the number, for logs and spans


# ScaleDecision(...) for decide, per tick: skips the NamedTuple's Python-level __new__, which only calls this
_new_decision = tuple.__new__


def _clamp(n: int, spec: ScalingSpec) -> int:
    hi, lo = spec.max_replicas, spec.min_replicas  # max(lo, min(hi, n)), without builtin calls
    n = n if n < hi else hi
    return n if n > lo else lo


def _want(avg: float, per_replica: float) -> int:
    """Replicas for a mean concurrency: Knative's ceil(observed / target); NaN or <= 0 wants none."""
    return math.ceil(avg / per_replica - 1e-9) if avg > 0 else 0


def decide(w: Window, spec: ScalingSpec, current: int, now: float) -> ScaleDecision:
    """The replica count a deployment should have at `now`, given `current` live replicas.

    Mutates only `w`'s panic, delay and inactivity bookkeeping. Knative's decider, in its order:
    stable and panic desires bounded by the per-tick rates around max(current, 1) and raised to
    `activation_scale`; panic tested on the panic desire *before* the rates, with zero replicas
    counted as one; in panic the larger of both desires and never below the panic high-water
    mark; panic ends once a stable window has strictly passed since the threshold was last met;
    then the scale-down delay. Going to zero also needs the scale-to-zero grace.
    """
    # Windows end at the newest bucket that can hold samples: `now`'s own bucket once a sample
    # fell into it, else the one before, so a second that has only just begun reads as no data
    # rather than as zero concurrency (which would flap a steady load down and up again).
    w.advance(now - BUCKET_S)
    stable_avg, panic_avg = w.averages()
    # inline arithmetic rather than helpers and min()/max(): this runs per deployment per tick
    per_replica = spec.target_concurrency * spec.utilization
    dspc = math.ceil(stable_avg / per_replica - 1e-9) if stable_avg > 0 else 0
    dppc = math.ceil(panic_avg / per_replica - 1e-9) if panic_avg > 0 else 0
    base = current if current > 0 else 1  # Knative: "use 1 if there are zero current pods"
    up = math.ceil(spec.max_scale_up_rate * base)
    down = math.floor(base / spec.max_scale_down_rate)
    want_stable = dspc if dspc < up else up
    if want_stable < down:
        want_stable = down
    want_panic = dppc if dppc < up else up
    if want_panic < down:
        want_panic = down
    act = spec.activation_scale
    if act > 1:
        if dspc > 0 and want_stable < act:
            want_stable = act
        if dppc > 0 and want_panic < act:
            want_panic = act

    if dppc / base >= spec.panic_threshold:
        w.start_panic(now, spec.stable_window_s)
    elif w.panic_since is not None and now > w.panic_until:
        w.panic_since = None
        w.max_panic = 0

    panic = w.panic_since is not None
    if panic:
        # a stable desire above the panic one is provisioned too (a surge that has already
        # reached the stable window), and nothing the panic decided is taken back during it
        desired = w.max_panic
        if want_stable > desired:
            desired = want_stable
        if want_panic > desired:
            desired = want_panic
        w.max_panic, reason = desired, "panic"
    else:
        desired, reason = want_stable, "stable"

    if spec.scale_down_delay_s > 0:
        held = w.hold(now, desired, spec.scale_down_delay_s)
        if held > desired:
            desired, reason = held, "scale-down-delay"

    if desired < current and now - w.observed_since < spec.stable_window_s:
        desired, reason = current, "warming-up"  # restarted: a full stable window before any scale-down
    if desired > 0:
        w.inactive_since = None
    else:
        if w.inactive_since is None:
            w.inactive_since = now  # Knative marks the revision inactive here; its grace starts
        # within the grace a deployment keeps one replica, also one it just lost to a failure:
        # going to zero is a decision about traffic, never a side effect of a host dying
        since = w.last_traffic if spec.scale_to_zero_grace_from == "last-traffic" else w.inactive_since
        if now - since < spec.scale_to_zero_after_s:
            desired, reason = 1, "grace"
    if desired > spec.max_replicas:
        desired, reason = spec.max_replicas, "max"
    if desired < spec.min_replicas:
        desired, reason = spec.min_replicas, "min"
    return _new_decision(ScaleDecision, (desired, panic, stable_avg, panic_avg, reason))


def activation(
    w: Window, spec: ScalingSpec, current: int, concurrency: float, arrivals: int, now: float
) -> int:
    """Replicas to start at once for a traffic sample arriving while the deployment has none.

    Called by the service on every event, so a scale-from-zero waits for no tick. Returns 0
    when nothing should start (replicas exist, no traffic in the sample, or max_replicas is 0).
    Sized as Knative's first decision after a scale from zero is: this sample's desire, bounded
    by the up rate around one replica, at least `activation_scale`. It leaves its decision in
    `w` as that decision would: zero replicas count as one, so a desire of `panic_threshold` or
    more starts a panic, and the next ticks do not take back what it placed while it restores.
    """
    if current > 0 or not (concurrency > 0 or arrivals > 0):  # NaN concurrency is no traffic
        return 0
    want = _want(concurrency, spec.target_concurrency * spec.utilization)
    # max(1, activation_scale, min(up, want)) and one clamp, as comparisons: it runs per wake
    up = math.ceil(spec.max_scale_up_rate)
    n = want if want < up else up
    if n < spec.activation_scale:
        n = spec.activation_scale
    if n < 1:
        n = 1
    start = _clamp(n, spec)
    if start == 0:
        return 0
    if want >= spec.panic_threshold:
        w.start_panic(now, spec.stable_window_s)
        if n > w.max_panic:
            w.max_panic = n
    if spec.scale_down_delay_s > 0:
        w.hold(now, n, spec.scale_down_delay_s)
    w.inactive_since = None
    return start


def steady_until(w: Window, spec: ScalingSpec, current: int, decision: ScaleDecision, now: float) -> float:
    """Until when `decide` keeps answering `decision` for `current` replicas if no traffic sample
    is recorded: the earliest time it may answer otherwise (`now`: it cannot tell; math.inf:
    never). Deciding before then changes nothing a later decision reads (the window's expiry is
    caught up by Window.advance), so a caller may skip those decisions. Without a new sample both
    desires can only fall: a panic is not restarted once its desire is below the threshold, its
    high-water mark stays, and the stable desire's next fall is `Window.stable_until`.
    """
    if decision.desired != current or spec.scale_down_delay_s > 0:
        return now  # a scale to make, or a delay queue that every decision feeds
    per_replica = spec.target_concurrency * spec.utilization
    if w.panic_since is not None:
        dppc = math.ceil(decision.panic_avg / per_replica - 1e-9) if decision.panic_avg > 0 else 0
        # (current if current > 0 else 1): max(current, 1) as decide's base, without a builtin call
        if decision.reason != "panic" or dppc / (current if current > 0 else 1) >= spec.panic_threshold:
            return now  # each decision would push the panic's end out again
        return w.panic_until  # then it ends and the stable desire takes over
    if decision.reason == "grace":  # the stable desire is zero and stays so: until the grace ends
        since = w.last_traffic if spec.scale_to_zero_grace_from == "last-traffic" else w.inactive_since
        return now if since is None else since + spec.scale_to_zero_after_s
    if decision.reason != "stable":
        return now
    dspc = math.ceil(decision.stable_avg / per_replica - 1e-9) if decision.stable_avg > 0 else 0
    return w.stable_until(per_replica, dspc)
