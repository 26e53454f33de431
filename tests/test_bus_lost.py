"""A service whose NATS connection the server closes for good exits non-zero, so that a
supervisor sees it and restarts it, instead of running on with no heartbeats and no commands.

The server closes it the way nats-py never reopens: an authorization the connections no longer
pass, put in place by a config reload (nats-server answers each with -ERR 'Authorization
Violation' and closes it). The restorer, the freezer and the scaler run as `snapscale` processes
on their own nats-server here (the session's server is shared by the other tests).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import VENV_BIN

from snapscale.demo.procs import ProcessSet, free_port, log_tail, wait_port
from snapscale.scaler.lease import LEASE_KEY
from snapscale.shared import bus
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ConfServer:
    url: str
    conf: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def conf_server(tmp_path: Path) -> Iterator[ConfServer]:
    """A JetStream nats-server of this test's own, configured by a file it reloads on SIGHUP."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n')
    with open(tmp_path / "nats.log", "wb") as log:
        proc = subprocess.Popen([str(VENV_BIN / "nats-server"), "-c", str(conf)], stderr=log)
    wait_port(port)
    yield ConfServer(f"nats://127.0.0.1:{port}", conf, proc)
    proc.terminate()
    proc.wait(10)


def revoke_every_connection(server: ConfServer) -> None:
    with server.conf.open("a") as f:
        f.write('authorization { user: "someone", password: "else" }\n')
    server.proc.send_signal(signal.SIGHUP)


@pytest.mark.criu
@pytest.mark.slow
async def test_each_service_exits_non_zero_when_the_server_closes_its_connection(
    conf_server: ConfServer, settings: Settings, criu: CriuBinary, tmp_path: Path
) -> None:
    s = replace(settings, nats_url=conf_server.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSCALE_")}
    env.update(
        SNAPSCALE_NATS_URL=s.nats_url,
        SNAPSCALE_NAMESPACE=s.namespace,
        SNAPSCALE_SIGNING_KEY=s.signing_key.decode(),
        SNAPSCALE_STATE_DIR=str(tmp_path / "state"),
        SNAPSCALE_CACHE_DIR=str(tmp_path / "cache"),
        SNAPSCALE_STORE=f"file://{tmp_path / 'store'}",
        SNAPSCALE_CRIU=criu.path,
        SNAPSCALE_HOST_ID="h1",
        SNAPSCALE_SANDBOX=os.environ.get("SNAPSCALE_SANDBOX", "oci"),  # dev mode: conftest
    )
    me = [sys.executable, "-m", "snapscale"]
    procs = ProcessSet(tmp_path / "logs")
    try:
        for name, argv in (
            ("restorer", [*me, "restorer", "--host", "h1", "--heartbeat-s", "0.5"]),
            ("freezer", [*me, "freezer", "--host", "h1"]),
            ("scaler", [*me, "scaler", "--tick-s", "0.2", "--lease-s", "1"]),
        ):
            procs.start(name, argv, env, cwd=ROOT)
        b = await bus.open_bus(s, "test")
        try:  # each is up and on the bus: a heartbeat, a freeze consumer, a lease
            deadline = time.monotonic() + 60
            while not await _all_up(b):
                dead = [(m.name, log_tail(m.log_path)) for m in procs.dead()]
                assert not dead and time.monotonic() < deadline, f"not all up in 60 s: {dead}"
                await asyncio.sleep(0.2)
        finally:
            await b.close()

        t0 = time.monotonic()
        revoke_every_connection(conf_server)
        for _ in range(450):  # 45 s: they exit within one here; the bound is for a loaded machine
            if len(procs.dead()) == 3:
                break
            await asyncio.sleep(0.1)
        for m in procs.procs:
            rc = m.proc.poll()
            assert rc is not None, f"{m.name} still runs with its connection closed:\n{log_tail(m.log_path)}"
            assert rc != 0, f"{m.name} exited 0:\n{log_tail(m.log_path)}"
            assert "closed for good" in m.log_path.read_text(), log_tail(m.log_path)
        codes = {m.name: m.proc.poll() for m in procs.procs}
        print(f"exit codes {codes}, all within {time.monotonic() - t0:.1f} s")
    finally:
        procs.stop_all()


async def _all_up(b: bus.Bus) -> bool:
    if await bus.kv_get(b.kv[Bucket.HOSTS], "h1") is None:
        return False
    if await bus.kv_get(b.kv[Bucket.LEASES], LEASE_KEY) is None:
        return False
    try:
        await b.js.consumer_info(b.subjects.cmd_stream, b.subjects.durable("freezer", Verb.FREEZE, "h1"))
    except Exception:
        return False
    return True
