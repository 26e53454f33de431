"""REFERENCE MODEL, tests only: Knative Serving's KPA decision rules, ported from its Go source.

It produces the "Knative rules" column of the scaler's scenario comparisons
(`tests/scaler_scenarios.py`) and is checked against snapscale's policy in the table tests
(`tests/test_scaler_knative.py`). Production code never imports it.

Ported from knative/serving at commit 98e5ef90aa70 (2026-08-21), function by function:

* `pkg/autoscaler/aggregation/bucketing.go`: `TimedFloat64Buckets.Record`, `.WindowAverage`,
  `.IsEmpty` -> `Buckets` (1 s buckets, `config.BucketSize`);
* `pkg/autoscaler/aggregation/max/window.go` + `timewindow.go`: the scale-down delay -> `MaxWindow`;
* `pkg/autoscaler/scaling/autoscaler.go`: `autoscaler.Scale` -> `Decider.scale`;
* `pkg/autoscaler/metrics/collector.go`: `StableAndPanicConcurrency` (no data when the stable
  buckets are empty) -> `Revision.tick`;
* `pkg/autoscaler/scaling/multiscaler.go`: a decision per tick (`tickInterval`, 2 s) and a `Poke`
  when the last desire was 0 and a stat shows concurrency -> `Revision.sample`;
* `pkg/reconciler/autoscaling/kpa/scaler.go`: `scaler.scale` (bounds) and `handleScaleToZero`,
  and `kpa.go`: `computeActiveCondition`, the SKS mode -> `Revision.reconcile`.

Simplified, and said so where it matters: the reconciler runs once per decision (Knative
re-enqueues on status changes and timers); target burst capacity is one of its two extremes
(`activator="always"`: -1, the activator stays in the path; `"at-inactive"`: 0, it joins when the
revision goes inactive); scale-to-zero-pod-retention-period 0, the RPS metric, initial scale,
the weighted-exponential average and the progress deadline are left out.
Times are float seconds; Go's `time.Truncate(time.Second)` is `math.floor`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal


def _go_round6(x: float) -> float:
    """roundToNDigits(6, x): Go's math.Round rounds halves away from zero."""
    return math.copysign(math.floor(abs(x) * 1e6 + 0.5), x) / 1e6


class Buckets:
    """TimedFloat64Buckets with 1 s granularity: values recorded in a bucket add up."""

    def __init__(self, window_s: float) -> None:
        self.window = window_s
        self.buckets = [0.0] * math.ceil(window_s)
        self.first_write: float | None = None
        self.last_write = -math.inf  # Go's zero time: before everything
        self.total = 0.0

    def is_empty(self, now: float) -> bool:
        return math.floor(now) - self.last_write > self.window

    def record(self, now: float, value: float) -> None:
        bucket_time = math.floor(now)
        n = len(self.buckets)
        write_idx = bucket_time
        if self.last_write != bucket_time:
            if bucket_time + self.window > self.last_write:
                if self.first_write is None or self.first_write > bucket_time:
                    self.first_write = bucket_time
                if bucket_time > self.last_write:
                    if bucket_time - self.last_write >= self.window:
                        self.first_write = bucket_time
                        self.buckets = [0.0] * n
                        self.total = 0.0
                    else:
                        for i in range(int(self.last_write) + 1, write_idx + 1):
                            self.total -= self.buckets[i % n]
                            self.buckets[i % n] = 0.0
                    self.last_write = bucket_time
            else:
                return
        self.buckets[write_idx % n] += value
        self.total += value

    def window_average(self, now: float) -> float:
        now = math.floor(now)
        n = len(self.buckets)
        d = now - self.last_write
        assert self.first_write is not None or d >= self.window
        if d <= 0:
            assert self.first_write is not None
            num_b = min(self.last_write - self.first_write + 1, n)
            return _go_round6(self.total / num_b)
        if d < self.window:
            assert self.first_write is not None
            st, e = int(self.last_write), int(now)
            ret = self.total
            for i in range(st + 1, e + 1):
                ret -= self.buckets[i % n]
            num_b = min(self.last_write - self.first_write + 1, n - (e - st))
            return _go_round6(ret / num_b)
        return 0.0


class MaxWindow:
    """max.TimeWindow: the largest value recorded within `duration`, in `granularity` buckets."""

    def __init__(self, duration_s: float, granularity_s: float) -> None:
        self.size = math.ceil(duration_s / granularity_s)
        self.granularity = granularity_s
        self.maxima: deque[tuple[int, int]] = deque()  # (index, value), values descending

    def record(self, now: float, value: int) -> None:
        index = int(now) // int(self.granularity)
        m = self.maxima
        while m and not value < m[-1][1]:
            m.pop()
        while m and index - m[0][0] >= self.size:
            m.popleft()
        if m and m[-1][0] == index:
            value = max(value, m.pop()[1])
        m.append((index, value))

    def current(self) -> int:
        return self.maxima[0][1]


@dataclass
class DeciderSpec:
    target: float  # TargetValue: the per-pod concurrency to hold (target x utilization)
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_s: float = 0.0
    activation_scale: int = 1
    min_scale: int = 0
    max_scale: int = 0  # 0: no limit
    grace_s: float = 30.0  # scale-to-zero-grace-period
    tick_s: float = 2.0  # multiscaler.go tickInterval


@dataclass
class Decider:
    """autoscaler.Scale's state and rule (reachable revision; concurrency metric)."""

    spec: DeciderSpec
    panic_time: float | None = None
    max_panic_pods: int = 0
    delay: MaxWindow | None = None

    def __post_init__(self) -> None:
        if self.spec.scale_down_delay_s > 0:
            self.delay = MaxWindow(self.spec.scale_down_delay_s, self.spec.tick_s)

    def scale(self, now: float, ready: int, stable: float, panic: float) -> tuple[int, bool]:
        s = self.spec
        ready_f = max(1.0, float(ready))
        max_up = math.ceil(s.max_scale_up_rate * ready_f)
        max_down = math.floor(ready_f / s.max_scale_down_rate)
        dspc = math.ceil(stable / s.target)
        dppc = math.ceil(panic / s.target)
        want_stable = int(min(max(dspc, max_down), max_up))
        want_panic = int(min(max(dppc, max_down), max_up))
        if s.activation_scale > 1:
            if dspc > 0 and s.activation_scale > want_stable:
                want_stable = s.activation_scale
            if dppc > 0 and s.activation_scale > want_panic:
                want_panic = s.activation_scale
        over = dppc / ready_f >= s.panic_threshold
        if over:  # Go: "begin panicking" when panicTime is zero, else "extend the panic window"
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + s.stable_window_s < now:
            self.panic_time = None
            self.max_panic_pods = 0
        desired = want_stable
        if self.panic_time is not None:
            desired = max(desired, want_panic)
            self.max_panic_pods = max(self.max_panic_pods, desired)
            desired = self.max_panic_pods
        if self.delay is not None:
            self.delay.record(now, desired)
            desired = self.delay.current()
        return desired, self.panic_time is not None


@dataclass
class Revision:
    """One revision: metric buckets, decider, the PA reconciler and its Deployment's replicas."""

    spec: DeciderSpec
    activator: Literal["always", "at-inactive"] = "always"
    decider: Decider = field(init=False)
    stable: Buckets = field(init=False)
    panic: Buckets = field(init=False)
    desired_scale: int = 0  # decider.Status.DesiredScale; a revision long at zero
    replicas: int = 0  # the Deployment's spec.replicas
    pa: Literal["inactive", "activating", "active"] = "inactive"
    pa_since: float = -math.inf  # when the PA's Active condition last changed
    proxy_since: float = -math.inf  # when the activator joined the request path
    panicking: bool = False

    def __post_init__(self) -> None:
        self.decider = Decider(self.spec)
        self.stable = Buckets(self.spec.stable_window_s)
        self.panic = Buckets(self.spec.panic_window_s)

    def record(self, now: float, concurrency: float) -> None:
        """collection.record: one stat into both windows."""
        self.stable.record(now, concurrency)
        self.panic.record(now, concurrency)

    def tick(self, now: float, ready: int) -> None:
        """A decider tick (or a poke), then the reconciler."""
        if not self.stable.is_empty(now):  # else ErrNoData: no decision, DesiredScale stands
            self.desired_scale, self.panicking = self.decider.scale(
                now, ready, self.stable.window_average(now), self.panic.window_average(now)
            )
        self.reconcile(now, ready)

    def sample(self, now: float, concurrency: float, ready: int) -> None:
        """A request arriving: the activator reports its first request at once (one in flight),
        and the multiscaler pokes the decider when its last desire was zero."""
        if concurrency > 0 and self.desired_scale == 0:
            self.record(now, 1.0)
            self.tick(now, ready)

    def reconcile(self, now: float, ready: int) -> None:
        s = self.spec
        want = max(s.min_scale, self.desired_scale)
        if s.max_scale:
            want = min(s.max_scale, want)
        apply = True
        if want == 0:  # handleScaleToZero
            if self.pa == "activating":
                want, apply = -1, False  # scaleUnknown: keep trying until the progress deadline
            elif self.pa == "active":
                if now - self.pa_since >= s.stable_window_s:
                    apply = False  # (0, false): marks the PA inactive, the pods stay this round
                else:
                    want = 1  # active for less than a stable window: at most one for the rest
            elif not (now - self.pa_since >= s.grace_s or now - self.proxy_since >= s.grace_s):
                apply = False
        if apply:
            self.replicas = want
        serve = want > 0 and self.activator == "at-inactive"
        if not serve and self.proxy_since == math.inf:
            self.proxy_since = now
        elif serve:
            self.proxy_since = math.inf
        # computeActiveCondition (min ready = max(min-scale, 1) once initialized)
        new: Literal["inactive", "activating", "active"]
        if want == 0:
            new = "inactive"
        elif ready < max(s.min_scale, 1):
            new = "activating" if want > 0 or self.pa != "inactive" else "inactive"
        else:
            new = "active" if want > 0 or self.pa != "inactive" else "inactive"
        if new != self.pa:
            self.pa, self.pa_since = new, now
