"""A whole comparison: the trace's samples once, then every policy over them, then always-on.

Always-on holds, for every deployment, the most replicas any policy's decider gave it (at least
one) for the whole horizon: the GPUs a fleet without scale-down would keep.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace

from snapscale.scaler.config import ScalerConfig
from snapscale.simulate.engine import Progress, Sim
from snapscale.simulate.policies import ALWAYS_ON, POLICIES, Policy, Result
from snapscale.simulate.profile import Profile
from snapscale.simulate.samples import Samples, samples
from snapscale.simulate.trace import Trace


@dataclass
class Comparison:
    results: list[Result]  # always-on first
    deployments: int
    requests: int
    hosts: int
    gpus_per_host: int
    horizon_s: float
    prepare_s: float
    peak_rss_bytes: int
    tick_s: float = 1.0
    sampled: list[str] = field(default_factory=list)

    def by_name(self, name: str) -> Result:
        return next(r for r in self.results if r.policy == name)


def sample_deployments(trace: Trace, k: int = 4) -> tuple[int, ...]:
    """A few deployments spread over the popularity ranks (by request count): the busiest, the
    median of those with traffic, and some between."""
    order = sorted(range(len(trace.names)), key=lambda d: -len(trace.arrivals[d]))
    busy = [d for d in order if len(trace.arrivals[d])]
    if not busy:
        return ()
    picks = [busy[min(len(busy) - 1, int(len(busy) * q))] for q in (0.0, 0.02, 0.15, 0.5)[:k]]
    return tuple(dict.fromkeys(picks))


def compare(
    trace: Trace,
    profile: Profile,
    *,
    hosts: int,
    gpus_per_host: int,
    policies: tuple[Policy, ...] = POLICIES,
    tick_s: float = ScalerConfig.tick_s,
    checkpoints: bool = True,
    progress: Progress | None = None,
) -> Comparison:
    t0 = time.perf_counter()
    per: list[Samples] = [samples(trace, d) for d in range(len(trace.names))]
    prepare = time.perf_counter() - t0
    picked = sample_deployments(trace)
    results = [
        Sim(
            trace,
            per,
            p,
            profile,
            hosts=hosts,
            gpus_per_host=gpus_per_host,
            sampled=picked,
            cfg=replace(ScalerConfig(), tick_s=tick_s),
        ).run(progress)
        for p in policies
    ]
    peaks = [max([1, *(r.peaks[d] for r in results)]) for d in range(len(trace.names))]
    always = Result(ALWAYS_ON, "always-on: each deployment holds its peak")
    always.gpu_s = float(sum(peaks)) * trace.horizon_s  # one GPU a replica (the generator's specs)
    always.peaks = peaks
    return Comparison(
        [always, *results],
        len(trace.names),
        trace.requests,
        hosts,
        gpus_per_host,
        trace.horizon_s,
        prepare,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        tick_s,
        [trace.names[d] for d in picked],
    )
