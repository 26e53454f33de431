"""A deployment's traffic window: concurrency per 1 s bucket, summed over Knative's stable and
panic windows, what the policy (policy.py) decides from. Pure: time is a parameter. Recording a
sample is O(1); advancing expires only the buckets time has passed.
"""

from __future__ import annotations

import math
from collections import deque

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
        "_held",
        "_low",
        "_stamp",
        "_sum",
        "first_bucket",
        "head",
        "inactive_since",
        "last_traffic",
        "max_panic",
        "n_panic",
        "n_stable",
        "observed_since",
        "panic_since",
        "panic_sum",
        "panic_until",
        "stable_sum",
    )

    def __init__(self, spec: ScalingSpec, now: float) -> None:
        self.n_stable = max(1, math.ceil(spec.stable_window_s / BUCKET_S))
        self.n_panic = min(self.n_stable, max(1, math.ceil(spec.panic_window_s / BUCKET_S)))
        self._sum = [0.0] * self.n_stable
        self._cnt = [0] * self.n_stable
        self._stamp = [_EMPTY] * self.n_stable
        self.head = int(now // BUCKET_S)
        # no bucket below this holds a sample still in the window (a lower bound: expiring
        # buckets one at a time leaves it behind), so a jump of the head walks from here
        self._low = self.head + 1
        self.first_bucket: int | None = None  # the first bucket that got a sample
        self.stable_sum = 0.0
        self.panic_sum = 0.0
        self.last_traffic = -math.inf  # when a sample last showed arrivals or concurrency
        self.observed_since = now  # restart safety: no scale-down before a full stable window
        self.panic_since: float | None = None
        self.panic_until = -math.inf  # panic holds until a stable window passes without panic
        self.max_panic = 0  # the panic high-water mark: the largest count decided in this panic
        # since when the decided count is zero (None: above zero); "inactive since forever" at
        # first, so a new deployment with no traffic starts nothing
        self.inactive_since: float | None = -math.inf
        # the scale-down delay: (bucket, count) with counts strictly decreasing, so the front is
        # the highest count decided within the delay (Knative's max.window, 1 s buckets); made
        # on first use, so a deployment without a delay carries no queue
        self._held: deque[tuple[int, int]] | None = None

    def advance(self, now: float) -> None:
        """Move the head to `now`'s bucket, dropping buckets that left either window."""
        t = math.floor(now // BUCKET_S)  # an integral float's floor: int()'s value, without a type call
        h = self.head
        if t <= h:
            return
        ns = self.n_stable
        if t - h >= ns:
            # every bucket left both windows: the ring's slots keep their stale stamps (all <= h,
            # so no bucket index from here on matches one, and a slot is refilled when its stamp
            # differs) and only the sums start again, without allocating the ring anew
            self.stable_sum = self.panic_sum = 0.0
            self._low = t + 1
            self.head = t
            return
        stamp, sums, cnts = self._stamp, self._sum, self._cnt
        panic, stable, np_ = self.panic_sum, self.stable_sum, self.n_panic  # locals: runs per sample
        if t == h + 1:  # one bucket on, as a sample a second moves it: no loops to set up
            j = t - np_
            s = j % ns
            if stamp[s] == j:
                panic -= sums[s] / cnts[s]
            j = t - ns
            s = j % ns
            if stamp[s] == j:
                stable -= sums[s] / cnts[s]
                stamp[s] = _EMPTY
        else:  # walk the buckets that leave from the lowest that can hold a sample, and the
            # panic window's only up to h (no bucket past it holds a sample yet); conditional
            # expressions rather than min()/max(), whose calls cost more than these loops' bodies
            low = self._low
            lo, hi = h - np_ + 1, t - np_
            for j in range(lo if lo > low else low, (hi if hi < h else h) + 1):
                s = j % ns
                if stamp[s] == j:
                    panic -= sums[s] / cnts[s]
            lo, hi = h - ns + 1, t - ns
            for j in range(lo if lo > low else low, hi + 1):
                s = j % ns
                if stamp[s] == j:
                    stable -= sums[s] / cnts[s]
                    stamp[s] = _EMPTY
            if low <= hi:
                self._low = hi + 1
        # running sums drift by float rounding; an empty window must read exactly zero
        self.stable_sum = stable if stable >= 1e-9 else 0.0
        self.panic_sum = panic if panic >= 1e-9 else 0.0
        self.head = t

    def record(self, now: float, concurrency: float, arrivals: int = 0) -> bool:
        """Add one gateway sample taken at `now` (the scaler's receive time, immune to gateway skew).

        A sample that is no measurement (`sample_problem`) is refused, False, and the window stays
        as it was: one absurd value must not turn the running sums to inf, then NaN, and stop the
        deployment scaling until a restart. The decoder refuses such values on the wire already;
        this holds for any caller.
        """
        if not (0.0 <= concurrency <= MAX_CONCURRENCY and 0 <= arrivals <= MAX_ARRIVALS):
            return False  # what sample_problem names (NaN fails every comparison), without its text
        b = math.floor(now // BUCKET_S)  # as in advance: int()'s value without a type call
        ns = self.n_stable
        if concurrency > 0 or arrivals > 0:
            last = self.last_traffic
            if now - last >= ns * BUCKET_S:
                # the first traffic after a whole stable window without any: both windows start
                # again here, as Knative's buckets do after a gap, so a burst after an idle spell
                # is averaged over what was seen of it, not diluted by the idle seconds before
                self.first_bucket = b
            if now > last:
                self.last_traffic = now
        h = self.head
        if b > h:
            self.advance(now)
            h = b
        elif b <= h - ns:
            return True  # a measurement, older than the stable window: nothing to update
        first = self.first_bucket
        if first is None or b < first:
            self.first_bucket = b
        s = b % ns
        stamp, sums, cnts = self._stamp, self._sum, self._cnt
        if stamp[s] != b:
            stamp[s] = b
            if b < self._low:
                self._low = b
            sums[s] = delta = 0.0 + concurrency  # its mean, less the empty bucket's 0
            cnts[s] = 1
        else:
            n = cnts[s]
            old = sums[s]
            sums[s] = total = old + concurrency
            cnts[s] = n + 1
            delta = total / (n + 1) - old / n
        self.stable_sum += delta
        if b > h - self.n_panic:
            self.panic_sum += delta
        return True

    def averages(self) -> tuple[float, float]:
        """(stable, panic) mean concurrency; a window younger than its length averages what it saw."""
        first = self.first_bucket
        if first is None:
            return 0.0, 0.0
        seen = self.head - first + 1
        n, m = self.n_stable, self.n_panic  # conditionals, not min(): decide reads this every tick
        return self.stable_sum / (n if n < seen else seen), self.panic_sum / (m if m < seen else seen)

    def hold(self, now: float, count: int, delay_s: float) -> int:
        """Record the count decided at `now`; return the highest decided within `delay_s`.

        Knative's scale-down delay (pkg/autoscaler/aggregation/max/window.go): an ascending-minima
        queue over buckets, so a decision costs O(1) amortised however long the delay.
        """
        idx = int(now // BUCKET_S)
        span = delay_s / BUCKET_S  # an int gap >= span is >= Knative's ceil(delay / bucket)
        q = self._held
        if q is None:
            q = self._held = deque()
        while q and count >= q[-1][1]:
            q.pop()  # lower and older than `count`: can never be the highest again
        while q and idx - q[0][0] >= span:
            q.popleft()
        if q and q[-1][0] == idx:  # a higher count already decided in this bucket keeps it
            count = q.pop()[1]
        q.append((idx, count))
        return q[0][1]

    def stable_until(self, per_replica: float, want: int) -> float:
        """With no sample recorded, the earliest `now` at which `decide` would read a stable desire
        other than `want` as the window expires and dilutes (math.inf: never). The desire only
        falls (the sum loses buckets, the seen span grows), so each stretch between two expiries
        is checked at its end, and bisected only if it falls inside; near an empty window, where
        decide's rounding clamps to zero, it answers at once."""
        s, h, first = self.stable_sum, self.head, self.first_bucket
        if first is None or (s == 0.0 and want == 0):
            return math.inf if want == 0 else (h + 2) * BUCKET_S
        ns, sums, cnts = self.n_stable, self._sum, self._cnt

        def desire(s: float, h: int) -> int:
            seen = h - first + 1
            return math.ceil(s / (ns if seen > ns else seen) / per_replica - 1e-9) if s > 0 else 0

        stamp, cut = self._stamp, (h + 1) % ns  # slot order from `cut` on is bucket order
        gone_by = h - ns  # outside the comprehension: computed once, and `h` stays a plain local
        live = [j for j in stamp[cut:] + stamp[:cut] if j > gone_by]
        if h - first + 1 >= ns and desire(s, h) == want:
            # a full window (the common case): nothing dilutes, every head of a stretch reads the
            # desire its start read, so only an expiry can change it; the loop below, with its
            # in-stretch test (always `want` here) left out and `desire` inline: one test a bucket
            for j in live:
                s -= sums[j % ns] / cnts[j % ns]
                h = j + ns
                if s < 1e-6 or math.ceil(s / ns / per_replica - 1e-9) != want:
                    break
            return (h + 1) * BUCKET_S
        for j in live:
            gone = j + ns  # the first head without bucket j; before it only dilution moves the desire
            if gone - 1 > h and desire(s, gone - 1) != want:
                # the first head in (h, gone - 1] whose desire is not `want`: they are `want` up
                # to it and not after (the desire only falls), so a bisection finds it
                lo, hi = h + 1, gone - 1
                while lo < hi:
                    mid = (lo + hi) // 2
                    if desire(s, mid) == want:
                        lo = mid + 1
                    else:
                        hi = mid
                return (lo + 1) * BUCKET_S
            s -= sums[j % ns] / cnts[j % ns]
            h = gone
            if s < 1e-6 or desire(s, h) != want:
                break
        return (h + 1) * BUCKET_S  # decide at `now` reads the buckets up to now's previous: h + 1

    def start_panic(self, now: float, stable_window_s: float) -> None:
        """The panic desire met the threshold at `now`: panic (again) for a stable window."""
        if self.panic_since is None:
            self.panic_since = now
        self.panic_until = now + stable_window_s
