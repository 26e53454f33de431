"""The `snapscale traffic` generator: TrafficEvents for one deployment at a bounded rate, for tests
and demos, standing in for a gateway. It stops by itself after its duration.

Pure pacing (`schedule`) plus one publishing loop; it never waits for replies.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

from snapscale.shared import bus
from snapscale.shared.bus import TrafficEvent, check_token
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.settings import Settings

tracer = telemetry.tracer(__name__)
MAX_EVENTS_PER_S = 20.0  # a gateway reports a few times a second, not once per request


def schedule(rps: float, duration_s: float, events_per_s: float) -> Iterator[tuple[float, int]]:
    """(offset from start, arrivals to report) for each event; arrivals add up to rps x duration."""
    rate = max(0.1, events_per_s)
    n = max(1, math.ceil(duration_s * rate))
    sent = 0
    for i in range(n):
        due = round(rps * (i + 1) / rate)
        yield i / rate, due - sent
        sent = due


async def play(
    settings: Settings,
    deployment: str,
    *,
    rps: float,
    concurrency: float,
    duration_s: float,
    events_per_s: float | None = None,
) -> int:
    """Publish the events on `traffic.<deployment>`; returns how many went out."""
    if rps < 0 or concurrency < 0 or duration_s <= 0:
        raise ConfigError("traffic: rps and concurrency must be >= 0 and the duration > 0")
    rate = events_per_s or min(MAX_EVENTS_PER_S, max(rps, 1.0))
    try:
        check_token("deployment", deployment)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    b = await bus.open_bus(settings, "snapscale-traffic")
    subject = b.subjects.traffic(deployment)
    start = time.monotonic()
    count = 0
    try:
        for offset, arrivals in schedule(rps, duration_s, rate):
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            ev = TrafficEvent(
                deployment=deployment, ts=time.time(), arrivals=arrivals, concurrency=concurrency
            )
            # each event roots its own trace, as a gateway's would: the decision it causes continues it
            with tracer.start_as_current_span("traffic", attributes={"snapscale.deployment": deployment}):
                await bus.publish_core(b, subject, ev)
            count += 1
        await b.nc.flush()
    finally:
        await b.close()
    return count
