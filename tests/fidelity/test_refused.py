"""What cannot be frozen is refused with a named reason, and the refusal is visible and bounded:
a workload holding a UNIX socket connected to a server outside its sandbox (CRIU cannot dump half
of a connection). The freezer and the scaler run as their own processes on a real nats-server;
the freeze command is the auto-freeze's (not forced, keep running).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from test_fidelity import WORKLOAD
from test_freezer_service import checkpoint_events, freeze_cmd, next_event, put_spec, send

from snapscale.cli.verbs import deployments_table
from snapscale.client import Client
from snapscale.demo.procs import ProcessSet, log_tail
from snapscale.restorer import status as status_mod
from snapscale.shared import bus
from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec
from snapscale.shared.bus.subjects import Bucket
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.registry import SandboxRegistry

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def metric(port: int, name: str) -> dict[str, float]:
    """Series of `name` on a /metrics page: label text -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str, procs: ProcessSet) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        if time.monotonic() > deadline or procs.dead():
            logs = "\n".join(f"--- {m.name}\n{log_tail(m.log_path, 25)}" for m in procs.procs)
            raise AssertionError(f"not within {timeout_s}s: {what}\n{logs}")
        await asyncio.sleep(0.05)


@pytest.mark.criu
async def test_a_sandbox_holding_an_outside_unix_connection_is_refused_once_shown_and_not_retried(
    criu: CriuBinary, settings: Settings, the_bus: bus.Bus, tmp_path: Path
) -> None:
    outside = socket.socket(socket.AF_UNIX)
    outside.bind(str(tmp_path / "outside.sock"))  # a host daemon's socket, say
    outside.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(outside.accept()[0]), daemon=True).start()
    spec = DeploymentSpec(
        name="holds-unix",
        command=[sys.executable, str(WORKLOAD), "--external-unix", str(tmp_path / "outside.sock")],
        cwd=str(tmp_path),
        hooks=HooksSpec(),
        ready=ReadySpec(http_path="/healthz", timeout_s=30.0, interval_s=0.05),
    )
    await put_spec(the_bus, spec)
    metrics_port = free_port()
    env = {
        **os.environ,
        "SNAPSCALE_NATS_URL": settings.nats_url,
        "SNAPSCALE_NAMESPACE": settings.namespace,
        "SNAPSCALE_SIGNING_KEY": settings.signing_key.decode(),
        "SNAPSCALE_STATE_DIR": str(settings.state_dir),
        "SNAPSCALE_CACHE_DIR": str(settings.cache_dir),
        "SNAPSCALE_STORE": settings.store.url,
        "SNAPSCALE_CRIU": criu.path,
        "SNAPSCALE_HOST_ID": settings.host_id,
    }
    me = [sys.executable, "-m", "snapscale"]
    procs = ProcessSet(tmp_path / "logs")
    run_dir = settings.state_dir / "run" / "src"
    sb = await engine.launch(spec, f"r-{uuid.uuid4().hex[:6]}", gpu_uuids=[], run_dir=run_dir)
    try:
        await engine.wait_ready(sb, spec.ready, cwd=spec.cwd)
        SandboxRegistry(settings.state_dir).put(sb)
        procs.start("freezer", [*me, "freezer", "--host", settings.host_id],
                    dict(env, SNAPSCALE_METRICS_PORT=str(metrics_port)), cwd=ROOT)  # fmt: skip
        procs.start("scaler", [*me, "scaler", "--tick-s", "0.2", "--lease-s", "1"], env, cwd=ROOT)

        async def leading() -> bool:  # acting on events, not merely holding the lease in KV
            return " leads with " in log_tail(procs.procs[1].log_path, 50)

        await until(leading, 30, "a leading scaler", procs)
        async with checkpoint_events(the_bus, spec.name) as events:
            # the auto-freeze fails, with the reason named
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
            ev = await next_event(events)
            assert not ev.ok and ev.refusal == "external-unix-socket" and ev.compat_hash, ev.reason
            assert "External socket is used" in ev.reason or "half of stream unix" in ev.reason
            assert sandbox.is_running(sb)  # it keeps serving

            # the scaler records it per deployment and key; the operator's views show it
            key = bus.refusal_key(spec.name, ev.compat_hash)

            async def recorded() -> bool:
                return await bus.kv_get(the_bus.kv[Bucket.LEASES], key) is not None

            await until(recorded, 10, "the refusal in KV", procs)
            async with Client(settings) as c:
                table = deployments_table(await c.deployments())
                shown = status_mod.render(await c.status())
            row = next(line for line in table.splitlines() if line.startswith(spec.name))
            assert "cannot be frozen: external-unix-socket since " in row, table
            assert "CANNOT BE FROZEN" in shown and "cannot be frozen: external-unix-socket" in shown, shown

            # the next auto-freeze (the next cold boot's) is skipped: no second dump
            dumps = sorted(run_dir.glob("criu-dump-*.log"))
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
            again = await next_event(events)
            assert again.ok and again.skipped and "cannot be frozen: external-unix-socket" in again.reason
            assert sorted(run_dir.glob("criu-dump-*.log")) == dumps

            # the operator's freeze tries again (and fails again: counted on the same record)
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica, force=True))
            forced = await next_event(events)
            assert not forced.ok and forced.refusal == "external-unix-socket"

            async def counted_twice() -> bool:
                got = await bus.kv_get(the_bus.kv[Bucket.LEASES], key)
                return got is not None and bus.read_refusals([(key, got[0])])[0].failures == 2

            await until(counted_twice, 10, "the second failure on the record", procs)
        series = metric(metrics_port, "snapscale_freeze_failures_total")
        assert [v for labels, v in series.items() if 'snapscale_reason="external-unix-socket"' in labels] == [
            2.0
        ]
    finally:
        procs.stop_all()
        await engine.stop(sb)
        outside.close()
        for s in held:
            with contextlib.suppress(OSError):
                s.close()
