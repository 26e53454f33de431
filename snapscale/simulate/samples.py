"""A deployment's traffic as the scaler sees it: per second, the mean concurrency and the arrivals.

The gateway reports concurrency at least once a second while a deployment has traffic, and the
policy only reads those aggregates, so the simulator feeds it one sample per busy second instead
of one event per request. Seconds without traffic are left out (an empty bucket reads as zero).
Stored in `array.array`s: compact, and indexing gives Python numbers, which keep the policy fast.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from snapscale.simulate.trace import Floats, Trace


@dataclass
class Samples:
    secs: array[int]  # the busy seconds, ascending
    conc: array[float]  # mean requests in flight over that second
    arrivals: array[int]  # requests that arrived in it
    times: array[float]  # every request's arrival, ascending (latency of the ones that waited)
    peak_conc: float


def per_second(arrivals: Floats, durations: Floats) -> tuple[Floats, Floats, Floats]:
    """(seconds, mean concurrency, arrivals) over the seconds any request arrived or ran in."""
    if len(arrivals) == 0:
        e = np.empty(0)
        return e, e, e
    start = np.floor(arrivals)
    end = arrivals + durations
    span = (np.ceil(end) - start).astype(np.int64)
    secs: list[Floats] = []
    weights: list[Floats] = []
    for k in range(int(span.max()) if len(span) else 0):
        m = span > k
        s = start[m] + k
        overlap = np.minimum(end[m], s + 1.0) - np.maximum(arrivals[m], s)
        secs.append(s)
        weights.append(np.clip(overlap, 0.0, 1.0))
    secs.append(start)
    weights.append(np.zeros(len(start)))
    allsec = np.concatenate(secs)
    uniq, inv = np.unique(allsec, return_inverse=True)
    conc = np.bincount(inv, weights=np.concatenate(weights), minlength=len(uniq))
    count = np.bincount(np.searchsorted(uniq, start), minlength=len(uniq)).astype(np.float64)
    return uniq, conc.astype(np.float64), count


def samples(trace: Trace, d: int) -> Samples:
    secs, conc, count = per_second(trace.arrivals[d], trace.durations[d])
    return Samples(
        array("q", secs.astype(np.int64).tobytes()),
        array("d", conc.astype(np.float64).tobytes()),
        array("q", count.astype(np.int64).tobytes()),
        array("d", np.asarray(trace.arrivals[d], dtype=np.float64).tobytes()),
        float(conc.max()) if len(conc) else 0.0,
    )
