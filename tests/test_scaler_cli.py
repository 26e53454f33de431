"""`snapscale traffic` and `snapscale scaler` as an operator runs them: real processes, a real
nats-server; the traffic pacing as a pure table."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from snapscale.scaler.traffic import schedule
from snapscale.shared import bus
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.messages import TrafficEvent, decode_message
from snapscale.shared.bus.subjects import Bucket
from snapscale.shared.core.settings import Settings


@pytest.mark.parametrize(
    ("rps", "duration_s", "rate", "events", "arrivals"),
    [(100.0, 2.0, 20.0, 40, 200), (3.0, 2.0, 3.0, 6, 6), (0.0, 1.0, 10.0, 10, 0), (7.0, 1.0, 2.0, 2, 7)],
)
def test_schedule_is_bounded_and_adds_up(
    rps: float, duration_s: float, rate: float, events: int, arrivals: int
) -> None:
    plan = list(schedule(rps, duration_s, rate))
    assert len(plan) == events
    assert sum(a for _t, a in plan) == arrivals
    assert all(0 <= t < duration_s for t, _a in plan)


def env_for(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "SNAPSCALE_NATS_URL": settings.nats_url,
        "SNAPSCALE_NAMESPACE": settings.namespace,
        "SNAPSCALE_STATE_DIR": str(settings.state_dir),
        "SNAPSCALE_HOST_ID": "scaler-cli",
    }


async def test_traffic_verb_publishes_and_stops_by_itself(the_bus: Bus, settings: Settings) -> None:
    got: list[TrafficEvent] = []
    traces: set[str] = set()

    async def cb(m: Msg) -> None:
        got.append(decode_message(m.data, TrafficEvent))
        traces.add((m.headers or {}).get("traceparent", "-").split("-")[1])

    sub = await the_bus.nc.subscribe(the_bus.subjects.traffic("llm"), cb=cb)
    await the_bus.nc.flush()
    cmd = [
        sys.executable,
        "-m",
        "snapscale",
        "traffic",
        "llm",
        "--rps",
        "40",
        "--concurrency",
        "3",
        "--for",
        "1s",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    assert b"published 20 traffic events" in out
    assert len(got) == 20
    assert sum(e.arrivals for e in got) == 40
    assert {e.concurrency for e in got} == {3.0}
    assert len(traces) == 20, "each event roots its own trace, carried in its headers"


def test_traffic_verb_refuses_a_bad_deployment(settings: Settings) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "snapscale", "traffic", "no.dots", "--for", "1s"],
        env=env_for(settings), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert "must match" in r.stderr


async def test_scaler_verb_leads_and_drains_on_sigterm(
    the_bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    logf = tmp_path / "scaler.log"
    with logf.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "snapscale", "scaler", "--tick-s", "0.2", "--lease-s", "1",
            env=env_for(settings), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while await bus.kv_get(the_bus.kv[Bucket.LEASES], "scaler.leader") is None:
            assert time.monotonic() < deadline, logf.read_text()
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = await asyncio.wait_for(proc.wait(), 10)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert rc == 0, logf.read_text()
    assert stopped_in < 5, f"drained in {stopped_in:.1f}s"
    # a clean stop hands the lease back so a standby need not wait for it to lapse
    assert await bus.kv_get(the_bus.kv[Bucket.LEASES], "scaler.leader") is None
