"""Scaler scenarios on virtual time: snapscale's policy beside Knative's rules (`knative_ref.py`).

Each scenario is a traffic shape; both sides see the same one, sampled every 0.1 s, and keep
replicas that become ready `RESTORE_S` after they are started:

* snapscale: the policy as `scaler/service.py` drives it. Every sample is a gateway report
  (silence while nothing is in flight), recorded in the `Window` and offered to `activation`;
  `decide` runs every tick with `current` = replicas started and not released; a scale-down
  releases ready replicas only (as `actions.py` does).
* Knative: the reference model. Every second one stat (the second's mean concurrency) is
  recorded while a pod is ready or a request is in flight (the scraper and the activator);
  the first request at zero is reported at once and pokes the decider; the decider ticks every
  `tick_s` and the reconciler follows; a scale-down deletes pods that are not ready first.

Print the comparison table (docs/scaling.md):
    PYTHONPATH=$PWD .venv/bin/python tests/scaler_scenarios.py
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from knative_ref import DeciderSpec, Revision

from snapscale.scaler.policy import activation, decide
from snapscale.scaler.window import Window
from snapscale.shared.bus.spec import ScalingSpec

SAMPLE_S = 0.1
RESTORE_S = 3.0  # a restore from the host cache is 2.4-4.5 s on an H100/H200 (docs/benchmarks.md)
T0 = 100_000.0  # virtual time starts here; the scaler has been running (and watching) long before

# a GPU deployment: 10 requests in flight per replica at 70 %, so 7 per replica
SPEC = ScalingSpec(target_concurrency=10.0, utilization=0.7, max_replicas=50)


def knative_spec(s: ScalingSpec, tick_s: float) -> DeciderSpec:
    """The same knobs under their Knative names."""
    return DeciderSpec(
        target=s.target_concurrency * s.utilization,
        stable_window_s=s.stable_window_s,
        panic_window_s=s.panic_window_s,
        panic_threshold=s.panic_threshold,
        max_scale_up_rate=s.max_scale_up_rate,
        max_scale_down_rate=s.max_scale_down_rate,
        scale_down_delay_s=s.scale_down_delay_s,
        activation_scale=s.activation_scale,
        min_scale=s.min_replicas,
        max_scale=s.max_replicas,
        grace_s=s.scale_to_zero_after_s,
        tick_s=tick_s,
    )


Traffic = Callable[[float], float]  # seconds since T0 -> requests in flight


def phases(*segments: tuple[float, float, float, float]) -> Traffic:
    """(from_s, to_s, concurrency at from_s, at to_s): linear within a segment, zero outside all."""

    def at(t: float) -> float:
        for t1, t2, c1, c2 in segments:
            if t1 <= t < t2:
                return c1 + (c2 - c1) * (t - t1) / (t2 - t1)
        return 0.0

    return at


@dataclass
class Outcome:
    decisions: int = 0  # decisions whose count differed from the decision before
    changes: int = 0  # decisions that changed the replica count
    restores: int = 0  # replicas started
    releases: int = 0  # replicas released (Knative: pods deleted, ready or not)
    peak: int = 0
    zero_at: float | None = None  # when the count last reached zero (seconds since T0)
    panics: int = 0  # times panic mode was entered

    def note(self, t: float, before: int, after: int, *, counted: bool) -> None:
        if after == before:
            return
        if counted:
            self.changes += 1
            self.restores += max(0, after - before)
            self.releases += max(0, before - after)
            self.peak = max(self.peak, after)
        self.zero_at = t if after == 0 else None

    def decided(self, t: float, before: int, after: int, *, counted: bool) -> int:
        self.decisions += before != after and counted
        return after


class Pods:
    """Replicas started at a time, ready RESTORE_S later."""

    def __init__(self) -> None:
        self.started: list[float] = []

    def is_ready(self, s: float, now: float) -> bool:
        return now - s >= RESTORE_S - 1e-9

    def ready(self, now: float) -> int:
        return sum(1 for s in self.started if self.is_ready(s, now))

    def add(self, n: int, now: float) -> None:
        self.started += [now] * n

    def remove(self, n: int, now: float, *, ready_only: bool) -> None:
        """Remove up to n, newest first: ready ones only, or (Kubernetes) not-ready ones first."""
        order = sorted(self.started, key=lambda s: (self.is_ready(s, now), -s))
        if ready_only:
            order = [s for s in order if self.is_ready(s, now)]
        for s in order[:n]:
            self.started.remove(s)


def _steps(until_s: float) -> range:
    return range(round(until_s / SAMPLE_S) + 1)


def run_snapscale(
    spec: ScalingSpec, traffic: Traffic, until_s: float, tick_s: float = 1.0, from_s: float = 0.0
) -> Outcome:
    """What snapscale's policy does with `traffic`; changes before `from_s` are not counted."""
    w = Window(spec, T0 - 10_000.0)
    pods, out = Pods(), Outcome()
    per_tick = round(tick_s / SAMPLE_S)
    was_panic = False
    last = 0  # the count last decided

    def to(n: int, now: float, t: float) -> None:
        nonlocal last
        last = out.decided(t, last, n, counted=t >= from_s)
        current = len(pods.started)
        if n > current:
            pods.add(n - current, now)
        elif n < current:
            pods.remove(current - n, now, ready_only=True)
        out.note(t, current, len(pods.started), counted=t >= from_s)

    for k in _steps(until_s):
        t = k * SAMPLE_S
        now = T0 + t
        c = traffic(t)
        if c > 0:
            w.record(now, c, 1)
            n = activation(w, spec, len(pods.started), c, 1, now)
            if n:
                to(n, now, t)
        if k % per_tick == 0:
            d = decide(w, spec, len(pods.started), now)
            out.panics += d.panic and not was_panic and t >= from_s
            was_panic = d.panic
            to(d.desired, now, t)
    return out


def run_knative(
    spec: ScalingSpec,
    traffic: Traffic,
    until_s: float,
    tick_s: float = 1.0,
    activator: Literal["always", "at-inactive"] = "always",
    from_s: float = 0.0,
) -> Outcome:
    """What Knative's rules do with `traffic`; changes before `from_s` are not counted."""
    rev = Revision(knative_spec(spec, tick_s), activator)
    pods, out = Pods(), Outcome()
    per_tick = round(tick_s / SAMPLE_S)
    second: list[float] = []
    was_panic = False

    last = 0

    def follow(t: float) -> None:
        nonlocal last
        last = out.decided(t, last, rev.replicas, counted=t >= from_s)
        current = len(pods.started)
        if rev.replicas > current:
            pods.add(rev.replicas - current, T0 + t)
        elif rev.replicas < current:
            pods.remove(current - rev.replicas, T0 + t, ready_only=False)
        out.note(t, current, len(pods.started), counted=t >= from_s)

    for k in _steps(until_s):
        t = k * SAMPLE_S
        now = T0 + t
        c = traffic(t)
        ready = pods.ready(now)
        second.append(c)
        if c > 0:
            rev.sample(now, c, ready)
            follow(t)
        if k % 10 == 0 and k > 0:  # the second's stat, from the pods or the activator
            mean = sum(second[-10:]) / 10
            if ready > 0 or mean > 0:
                rev.record(now, mean)
        if k % per_tick == 0:
            rev.tick(now, ready)
            out.panics += rev.panicking and not was_panic and t >= from_s
            was_panic = rev.panicking
            follow(t)
    return out


# --- the scenarios ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    name: str
    traffic: Traffic
    until_s: float
    spec: ScalingSpec = SPEC
    stop_s: float | None = None  # traffic stops here: time to zero is measured from it
    activator: Literal["always", "at-inactive"] = "always"
    from_s: float = 0.0  # what happens before is not counted (a warm-up phase)


def _sine(lo: float, hi: float, period_s: float, until_s: float) -> Traffic:
    def at(t: float) -> float:
        return lo + (hi - lo) * (0.5 - 0.5 * math.cos(2 * math.pi * t / period_s)) if t < until_s else 0.0

    return at


def _spikes(base: float, peaks: list[float], every_s: float, for_s: float, until_s: float) -> Traffic:
    """`base` in flight, and from 60 s on a spike of `for_s` every `every_s`, cycling through `peaks`."""

    def at(t: float) -> float:
        if t >= until_s:
            return 0.0
        if t >= 60.0 and (t - 60.0) % every_s < for_s:
            return peaks[int((t - 60.0) // every_s) % len(peaks)]
        return base

    return at


BURST = phases((0, 1, 0, 200), (1, 120, 200, 200))
AFTER_IDLE = phases((0, 60, 20, 20), (660, 780, 200, 200))
STOP = phases((0, 300, 50, 50))
SINE = _sine(10, 18, 120, 600)
# 12 in flight holds 2 replicas; a 4 s spike to 28 puts the panic desire at 4 = 2 x 2 (panic),
# one to 24 at 3 (none); neither moves the stable desire off 2
SPIKES = _spikes(12, [24, 28], 90, 4, 900)
INACTIVE = replace(SPEC, scale_to_zero_grace_from="inactive")

SCENARIOS = [
    Scenario("burst from zero to 200 in flight in 1 s, held 2 min", BURST, 120),
    Scenario("200 at once after 10 min idle (20 for 1 min before), held 2 min", AFTER_IDLE, 780, from_s=600),
    Scenario("50 for 5 min, then none; grace from last traffic", STOP, 500, stop_s=300),
    Scenario(
        "50 for 5 min, then none; grace from inactive", STOP, 500, INACTIVE, 300, activator="at-inactive"
    ),
    Scenario(
        "the same with a scale-down delay of 30 s",
        STOP,
        500,
        replace(INACTIVE, scale_down_delay_s=30.0),
        300,
        activator="at-inactive",
    ),
    Scenario("10 to 18 in flight, a 2 min sine for 10 min (a replica boundary at 14)", SINE, 600),
    Scenario("the same with a scale-down delay of 90 s", SINE, 600, replace(SPEC, scale_down_delay_s=90.0)),
    Scenario("12 in flight, 4 s spikes to 24 and 28 by turns every 90 s, 15 min", SPIKES, 900, from_s=30),
]


def compare(sc: Scenario) -> tuple[Outcome, Outcome, Outcome]:
    """(snapscale at a 1 s tick, Knative's rules at a 1 s tick, Knative's rules at its 2 s tick)."""
    return (
        run_snapscale(sc.spec, sc.traffic, sc.until_s, 1.0, sc.from_s),
        run_knative(sc.spec, sc.traffic, sc.until_s, 1.0, sc.activator, sc.from_s),
        run_knative(sc.spec, sc.traffic, sc.until_s, 2.0, sc.activator, sc.from_s),
    )


def _cell(o: Outcome, sc: Scenario) -> str:
    zero = ""
    if sc.stop_s is not None:
        zero = f", zero after {o.zero_at - sc.stop_s:.0f} s" if o.zero_at is not None else ", not at zero"
    return f"{o.changes} / {o.restores} / {o.releases} (peak {o.peak}, panics {o.panics}{zero})"


def table() -> str:
    rows = [
        "| scenario | snapscale | Knative rules, 1 s tick | Knative rules, 2 s tick |",
        "|---|---|---|---|",
    ]
    for sc in SCENARIOS:
        s, k1, k2 = compare(sc)
        rows.append(f"| {sc.name} | {_cell(s, sc)} | {_cell(k1, sc)} | {_cell(k2, sc)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print("cells: decisions that changed the count / restores / releases")
    print(table())
