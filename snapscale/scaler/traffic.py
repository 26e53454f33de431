"""The `snapscale traffic` generator: TrafficEvents for one deployment at a bounded rate, for tests
and demos, standing in for a gateway. It stops by itself after its duration.

Pure pacing (`schedule`) plus one publishing loop; it never waits for replies.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator

from snapscale.shared import bus
from snapscale.shared.bus import TrafficEvent, check_token
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import ConfigError

tracer = telemetry.tracer(__name__)
MAX_EVENTS_PER_S = 20.0  # a gateway reports a few times a second, not once per request
MAX_RPS = 1e6  # beyond any one deployment's traffic: a larger number is a typo
MAX_DURATION_S = 7 * 24 * 3600.0


def schedule(rps: float, duration_s: float, events_per_s: float) -> Iterator[tuple[float, int]]:
    """(offset from start, arrivals to report) for each event; arrivals add up to rps x duration."""
    rate = max(0.1, events_per_s)
    n = max(1, math.ceil(duration_s * rate))
    sent = 0
    for i in range(n):
        due = round(rps * (i + 1) / rate)
        yield i / rate, due - sent
        sent = due


def check_traffic(
    deployment: str, *, rps: float, concurrency: float, duration_s: float, events_per_s: float | None
) -> float:
    """The event rate to play at, once the arguments are known to be sane (finite, in range);
    a `ConfigError` naming the argument otherwise. Pure: called before anything connects."""
    try:
        check_token("deployment", deployment)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, value, hi in (
        ("rps", rps, MAX_RPS),
        ("concurrency", concurrency, MAX_RPS),
        ("duration", duration_s, MAX_DURATION_S),
        ("events per second", events_per_s or 1.0, MAX_RPS),
    ):
        if not (math.isfinite(value) and 0 <= value <= hi):
            raise ConfigError(f"traffic: {name} must be a number in [0, {hi:g}], got {value!r}")
    if duration_s <= 0:
        raise ConfigError("traffic: the duration must be above 0")
    return events_per_s or min(MAX_EVENTS_PER_S, max(rps, 1.0))


async def play(
    b: bus.Bus,
    deployment: str,
    *,
    rps: float,
    concurrency: float,
    duration_s: float,
    events_per_s: float | None = None,
    on_event: Callable[[int, int], None] | None = None,
) -> int:
    """Publish the events on `traffic.<deployment>`; returns how many went out. `on_event(sent,
    total)` follows along (a progress display)."""
    rate = check_traffic(
        deployment, rps=rps, concurrency=concurrency, duration_s=duration_s, events_per_s=events_per_s
    )
    subject = b.subjects.traffic(deployment)
    steps = list(schedule(rps, duration_s, rate))
    start = time.monotonic()
    count = 0
    for offset, arrivals in steps:
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ev = TrafficEvent(deployment=deployment, ts=time.time(), arrivals=arrivals, concurrency=concurrency)
        # each event roots its own trace, as a gateway's would: the decision it causes continues it
        with tracer.start_as_current_span("traffic", attributes={"snapscale.deployment": deployment}):
            await bus.publish_core(b, subject, ev)
        count += 1
        if on_event is not None:
            on_event(count, len(steps))
    await b.nc.flush()
    return count
