"""The autoscaling policy: Knative-KPA-like desired replica counts from observed concurrency.

Pure: time is a parameter, nothing sleeps or does I/O. A `Window` is the only thing mutated,
in O(1) per traffic sample; `decide` is O(1) amortised, so one core makes >100k decisions/s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from snapscale.shared.bus import MAX_CONCURRENCY, ScalingSpec

BUCKET_S = 1.0  # window granularity, as Knative's 1 s metric buckets
MAX_ARRIVALS = 10**9  # arrivals in one sample, as the wire allows
_EMPTY = -(1 << 62)  # a slot stamp no bucket index can have (indices may be negative)


class Window:
    """Per-deployment observations: concurrency averaged per bucket, summed over two windows.

    A bucket holds the mean of the samples that fell into it; a bucket without samples counts
    as zero concurrency (a gateway reports at least once a second while it has traffic).
    The stable and panic sums are kept running, so neither recording nor deciding loops over
    the window except to expire buckets that time has passed.
    """

    __slots__ = (
        "_cnt",
        "_n_panic",
        "_n_stable",
        "_stamp",
        "_sum",
        "first_bucket",
        "head",
        "last_traffic",
        "max_panic",
        "observed_since",
        "panic_since",
        "panic_sum",
        "panic_until",
        "stable_sum",
    )

    def __init__(self, spec: ScalingSpec, now: float) -> None:
        self._n_stable = max(1, math.ceil(spec.stable_window_s / BUCKET_S))
        self._n_panic = min(self._n_stable, max(1, math.ceil(spec.panic_window_s / BUCKET_S)))
        self._sum = [0.0] * self._n_stable
        self._cnt = [0] * self._n_stable
        self._stamp = [_EMPTY] * self._n_stable
        self.head = int(now // BUCKET_S)
        self.first_bucket: int | None = None  # the first bucket that got a sample
        self.stable_sum = 0.0
        self.panic_sum = 0.0
        self.last_traffic = -math.inf  # when a sample last showed arrivals or concurrency
        self.observed_since = now  # restart safety: no scale-down before a full stable window
        self.panic_since: float | None = None
        self.panic_until = -math.inf  # panic holds until a stable window passes without panic
        self.max_panic = 0

    def advance(self, now: float) -> None:
        """Move the head to `now`'s bucket, dropping buckets that left either window."""
        t = int(now // BUCKET_S)
        h = self.head
        if t <= h:
            return
        ns, np_ = self._n_stable, self._n_panic
        if t - h >= ns:
            self._sum = [0.0] * ns
            self._cnt = [0] * ns
            self._stamp = [_EMPTY] * ns
            self.stable_sum = self.panic_sum = 0.0
        else:
            stamp, sums, cnts = self._stamp, self._sum, self._cnt
            for j in range(h - np_ + 1, t - np_ + 1):
                s = j % ns
                if stamp[s] == j:
                    self.panic_sum -= sums[s] / cnts[s]
            for j in range(h - ns + 1, t - ns + 1):
                s = j % ns
                if stamp[s] == j:
                    self.stable_sum -= sums[s] / cnts[s]
                    stamp[s] = _EMPTY
            # running sums drift by float rounding; an empty window must read exactly zero
            if self.stable_sum < 1e-9:
                self.stable_sum = 0.0
            if self.panic_sum < 1e-9:
                self.panic_sum = 0.0
        self.head = t

    def record(self, now: float, concurrency: float, arrivals: int = 0) -> bool:
        """Add one gateway sample taken at `now` (the scaler's receive time, immune to gateway skew).

        A sample that is no measurement (`sample_problem`) is refused, False, and the window stays
        as it was: one absurd value must not turn the running sums to inf, then NaN, and stop the
        deployment scaling until a restart. The decoder refuses such values on the wire already;
        this holds for any caller.
        """
        if sample_problem(concurrency, arrivals) is not None:
            return False
        if concurrency > 0 or arrivals > 0:
            self.last_traffic = max(self.last_traffic, now)
        b = int(now // BUCKET_S)
        if b > self.head:
            self.advance(now)
        elif b <= self.head - self._n_stable:
            return True  # a measurement, older than the stable window: nothing to update
        if self.first_bucket is None or b < self.first_bucket:
            self.first_bucket = b
        s = b % self._n_stable
        if self._stamp[s] != b:
            self._stamp[s] = b
            self._sum[s] = 0.0
            self._cnt[s] = 0
            old = 0.0
        else:
            old = self._sum[s] / self._cnt[s]
        self._sum[s] += concurrency
        self._cnt[s] += 1
        delta = self._sum[s] / self._cnt[s] - old
        self.stable_sum += delta
        if b > self.head - self._n_panic:
            self.panic_sum += delta
        return True

    def averages(self) -> tuple[float, float]:
        """(stable, panic) mean concurrency; a window younger than its length averages what it saw."""
        if self.first_bucket is None:
            return 0.0, 0.0
        seen = self.head - self.first_bucket + 1
        return (
            self.stable_sum / min(self._n_stable, seen),
            self.panic_sum / min(self._n_panic, seen),
        )


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


def _clamp(n: int, spec: ScalingSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, n))


def decide(w: Window, spec: ScalingSpec, current: int, now: float) -> ScaleDecision:
    """The replica count a deployment should have at `now`, given `current` live replicas.

    Mutates only `w`'s panic bookkeeping. Follows Knative's KPA: stable and panic desires
    bounded by the per-tick rates; panic starts when the panic desire reaches
    `panic_threshold` x current and ends a stable window after it was last met; in panic the
    count never drops. Going to zero also needs `scale_to_zero_after_s` without traffic.
    """
    # Windows end at the newest bucket that can hold samples: `now`'s own bucket once a sample
    # fell into it, else the one before, so a second that has only just begun reads as no data
    # rather than as zero concurrency (which would flap a steady load down and up again).
    w.advance(now - BUCKET_S)
    stable_avg, panic_avg = w.averages()
    per_replica = spec.target_concurrency * spec.utilization
    want_stable = math.ceil(stable_avg / per_replica - 1e-9) if stable_avg > 0 else 0
    want_panic = math.ceil(panic_avg / per_replica - 1e-9) if panic_avg > 0 else 0
    base = current if current > 0 else 1
    up = math.ceil(spec.max_scale_up_rate * base)
    down = math.floor(base / spec.max_scale_down_rate)
    want_stable = max(down, min(up, want_stable))
    want_panic = max(down, min(up, want_panic))

    if current > 0 and want_panic / current >= spec.panic_threshold:
        if w.panic_since is None:
            w.panic_since = now
        w.panic_until = now + spec.stable_window_s
    elif w.panic_since is not None and now >= w.panic_until:
        w.panic_since = None
        w.max_panic = 0

    if w.panic_since is not None:
        w.max_panic = max(w.max_panic, want_panic, current)
        desired, reason = w.max_panic, "panic"
    else:
        desired, reason = want_stable, "stable"

    if desired < current and now - w.observed_since < spec.stable_window_s:
        desired, reason = current, "warming-up"  # restarted: a full stable window before any scale-down
    # within the grace a deployment keeps one replica, also one it just lost to a failure:
    # going to zero is a decision about traffic, never a side effect of a host dying
    if desired == 0 and now - w.last_traffic < spec.scale_to_zero_after_s:
        desired, reason = 1, "grace"
    clamped = _clamp(desired, spec)
    if clamped != desired:
        reason = "min" if clamped > desired else "max"
    return ScaleDecision(clamped, w.panic_since is not None, stable_avg, panic_avg, reason)


def activation(spec: ScalingSpec, current: int, concurrency: float, arrivals: int) -> int:
    """Replicas to start at once for a traffic sample arriving while the deployment has none.

    Called by the service on every event, so a scale-from-zero waits for no tick. Returns 0
    when nothing should start (replicas exist, no traffic in the sample, or max_replicas is 0).
    """
    if current > 0 or (concurrency <= 0 and arrivals <= 0):
        return 0
    per_replica = spec.target_concurrency * spec.utilization
    want = max(1, math.ceil(max(concurrency, 0.0) / per_replica - 1e-9))
    return _clamp(want, spec)
