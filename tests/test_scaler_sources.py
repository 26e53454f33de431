"""Several gateways report one deployment: the scaler sums the latest report of each (a source
that went silent drops out), on the pure table, through the scaler service on a real nats-server,
and with two real gateways holding requests in front of it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace

import aiohttp
from gateway_harness import gateway
from test_scaler_service import CFG, FAST, SPEC, FakeHost, deploy, eventually, running

from snapscale.scaler.service import Scaler
from snapscale.scaler.sources import TrafficSources
from snapscale.shared import bus
from snapscale.shared.bus import Bus, ScaleUpCommand, TrafficEvent
from snapscale.shared.core.settings import Settings


def test_the_latest_report_of_each_source_is_summed() -> None:
    t = TrafficSources(stale_s=3.0)
    assert t.observe("llm", "gw-a", 3.0, 100.0) == 3.0
    assert t.observe("llm", "gw-b", 2.0, 100.2) == 5.0
    # a newer report replaces its source's older one instead of adding to it
    assert t.observe("llm", "gw-a", 1.0, 100.5) == 3.0
    # other deployments and unnamed sources (snapscale traffic) are apart
    assert t.observe("other", "", 4.0, 100.5) == 4.0
    assert t.observe("llm", "gw-b", 0.0, 101.0) == 1.0


def test_a_silent_source_drops_out_and_bad_values_count_as_zero() -> None:
    t = TrafficSources(stale_s=3.0)
    t.observe("llm", "gw-a", 5.0, 100.0)
    assert t.observe("llm", "gw-b", 1.0, 102.9) == 6.0
    assert t.observe("llm", "gw-b", 1.0, 103.1) == 1.0  # gw-a last spoke 3.1 s ago
    assert t.observe("llm", "gw-c", -2.0, 103.2) == 1.0
    assert t.observe("llm", "gw-c", math.nan, 103.3) == 1.0


async def test_two_gateways_reporting_three_each_get_six_replicas(the_bus: Bus, settings: Settings) -> None:
    """Averaged (the old way), reports of 3 and 3 read as 3 in flight and placed 3 replicas."""
    await deploy(the_bus, replace(SPEC, scaling=replace(FAST, max_replicas=10, scale_to_zero_after_s=30.0)))
    host = FakeHost(settings, "host-a", gpus=10, ready_after_s=None)  # replicas stay coming: counted
    sc = Scaler(settings, CFG)
    async with running(host.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            for gw in ("gw-a", "gw-b"):
                ev = TrafficEvent("llm", time.time(), arrivals=1, concurrency=3.0, source=gw)
                await bus.publish_core(the_bus, the_bus.subjects.traffic("llm"), ev)
            await asyncio.sleep(0.1)
        await eventually(lambda: len(host.commands(ScaleUpCommand)) >= 6, 5, "six replicas placed")
        await asyncio.sleep(0.5)  # a few more ticks: no seventh
        assert len(host.commands(ScaleUpCommand)) == 6
        assert sc.view.live_count("llm") == 6


async def test_two_real_gateways_holding_three_each_are_summed(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, replace(SPEC, scaling=replace(FAST, max_replicas=10, scale_to_zero_after_s=30.0)))
    host = FakeHost(settings, "host-a", gpus=10, ready_after_s=None)  # the requests stay held
    sc = Scaler(settings, CFG)
    async with running(host.run, sc.run):
        await eventually(lambda: sc.leader and "host-a" in sc.view.hosts)
        async with aiohttp.ClientSession() as http:

            async def get(url: str) -> int:
                async with http.get(f"{url}/llm/generate") as r:
                    return r.status

            async with gateway(settings, gateway_id="gw-a") as a, gateway(settings, gateway_id="gw-b") as b:
                held = [asyncio.create_task(get(g.url)) for g in (a, b) for _ in range(3)]
                await eventually(lambda: len(host.commands(ScaleUpCommand)) >= 6, 10, "six replicas placed")
                await asyncio.sleep(0.5)
                assert len(host.commands(ScaleUpCommand)) == 6
                assert sorted(sc.traffic_sources._latest["llm"]) == ["gw-a", "gw-b"]
            # the gateways stopped: what they held is answered, not left hanging
            assert await asyncio.gather(*held) == [503] * 6
