"""The fidelity matrix on real parts: one workload tree (tests/fidelity/workload.py) holding one of
each thing a model server holds, cold-booted, frozen by the freezer service (keep running, as the
auto-freeze does), released, and restored by the restorer service in a fresh netns, once. Each
test reads one row of its reports before and after. What cannot be frozen is in test_refused.py.

The matrix runs once per sandbox seam (seams.py; the fixture's parameter, in each test's id):
`host`, the host-process sandbox of development mode, and `oci`, an OCI container run by runc.
A row that differs between them says how, in its test. docs/fidelity.md lists the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import seams
from conftest import NatsServer
from restorer_harness import Harness, follow, running
from test_freezer_service import (
    FAST,
    checkpoint_events,
    freeze_cmd,
    next_event,
    put_spec,
    running_freezer,
    send,
)

from snapscale.shared import bus
from snapscale.shared.bus.messages import ReplicaState
from snapscale.shared.core.settings import Settings, StoreSettings
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe, sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.registry import SandboxRegistry
from snapscale.shared.engine.sandbox import Sandbox

WORKLOAD = seams.WORKLOAD


class EchoServer:
    """A TCP echo server on the host, outside every sandbox: the external peer."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, addr = self.sock.accept()
                self.peers.append(addr[0])
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(4096):
                conn.sendall(data)


@dataclass
class Matrix:
    seam: str  # seams.NAMES
    before: dict[str, Any]  # the frozen replica's report, just before the freeze
    after: dict[str, Any]  # the restored replica's first report
    later: dict[str, Any]  # its report once its external connection is back
    frozen_at: float  # wall clock at the freeze command
    restored_at: float  # wall clock when the restored replica was ready
    original: Sandbox
    restored: Sandbox
    peers: list[str]  # the external server's peers, in order
    original_log: str  # the appended file as the original left it
    log: str  # the appended file as the restored replica sees it


async def report(sb: Sandbox, note: str = "") -> dict[str, Any]:
    """The workload's rows; a report that does not come back fails with the workload's stacks."""
    try:
        status, body = await probe.http_request("GET", sb.endpoint, f"/report?note={note}", timeout_s=20)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.kill(sb.pid, signal.SIGUSR2)  # faulthandler: every thread's stack into its log
        await asyncio.sleep(0.5)
        raise AssertionError(
            f"no report from {sb.replica}: {e!r}\n{sandbox.log_tail(sb.log_path, 80)}"
        ) from e
    assert status == 200, body
    out: dict[str, Any] = json.loads(body)
    return out


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.05)


def module_settings(nats_url: str, tmp: Path) -> Settings:
    """The `settings` fixture's, for a module-scoped fixture (that one is per test)."""
    return Settings(
        nats_url=nats_url,
        namespace=f"t{uuid.uuid4().hex[:10]}",
        store=StoreSettings(url=f"file://{tmp}/store"),
        signing_key=b"test-signing-key",
        cache_dir=tmp / "cache",
        state_dir=tmp / "state",
        host_id="host-a",
    )


@pytest.fixture(scope="module", params=seams.NAMES)
async def matrix(
    request: pytest.FixtureRequest,
    nats_server: NatsServer,
    criu: CriuBinary,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Matrix]:
    tmp = tmp_path_factory.mktemp("fidelity")
    settings = module_settings(nats_server.url, tmp)
    server = EchoServer()
    shm = Path(f"/dev/shm/fidelity-{uuid.uuid4().hex[:12]}")  # the host's /dev/shm: removed below
    seam = seams.seam(request.param, tmp, server.port, shm)
    spec = seam.spec
    b = await bus.open_bus(settings, "fidelity-test")
    h = Harness(settings, b, criu, "fidelity", tmp)
    await put_spec(b, spec)  # before the launch: the freezer finds the spec the sandbox started with
    with seams.environment(seam):
        sb = await engine.launch(
            spec, f"r-{uuid.uuid4().hex[:6]}", gpu_uuids=[], run_dir=settings.state_dir / "run" / "src"
        )
        try:
            await engine.wait_ready(sb, spec.ready, cwd=spec.cwd)
            assert bool(sb.container) == (seam.name == "oci"), sb
            SandboxRegistry(settings.state_dir).put(sb)
            await until(partial(_pinged, sb), 10, "the external connection up")
            before = await report(sb, "before-freeze")
            frozen_at = time.time()
            async with running_freezer(settings, criu, FAST), checkpoint_events(b, spec.name) as events:
                await send(b, settings.host_id, freeze_cmd(spec, sb.replica))
                ev = await next_event(events)
            assert ev.ok and not ev.skipped and ev.checkpoint_id, ev.reason
            await report(sb, "after-freeze")  # the original appends on after the freeze
            original_log = (seam.files_of(sb) / "app.log").read_text()
            await engine.stop(sb)  # released: scaled to zero
            async with running(settings, criu) as (svc, _task):
                async for _ in follow(h):  # subscribed to replica events until the generator ends
                    replica = f"r-{uuid.uuid4().hex[:6]}"
                    await h.restore(spec.name, replica, deadline_s=60)
                    ready = await h.wait(replica, timeout_s=60)
                    assert ready.state is ReplicaState.READY and ready.checkpoint_id == ev.checkpoint_id, (
                        ready.reason
                    )
                    restored_at = time.time()
                    assert svc.host is not None
                    restored = svc.host.replicas.live[replica].sandbox
                    assert restored.container == (replica if seam.name == "oci" else ""), restored
                    after = await report(restored, "restored")
                    await until(partial(_reconnected, restored), 10, "the external connection back")
                    await asyncio.sleep(0.2)  # the worker thread ticks every 10 ms, the pinger every 20 ms
                    later = await report(restored)
                    log = (seam.files_of(restored) / "app.log").read_text()
                    yield Matrix(
                        seam.name, before, after, later, frozen_at, restored_at, sb, restored,
                        list(server.peers), original_log, log,
                    )  # fmt: skip
        finally:
            await engine.stop(sb)
            server.sock.close()
            await b.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm)


async def _pinged(sb: Sandbox) -> bool:
    r = await report(sb)
    return int(r["tcp_external"]["pings"]) > 0


async def _reconnected(sb: Sandbox) -> bool:
    r = await report(sb)
    return str(r["tcp_external"]["events"][-1]) == "connected" and len(r["tcp_external"]["events"]) > 1


pytestmark = [pytest.mark.criu]


def test_threads_come_back_running_with_their_ids(matrix: Matrix) -> None:
    b, a, later = matrix.before["threads"], matrix.after["threads"], matrix.later["threads"]
    assert a["alive"] and a["tid"] == b["tid"]
    assert b["ticks"] <= a["ticks"] < later["ticks"]  # counting on from where it was frozen


def test_child_process_on_pipes_is_the_same_process_and_answers(matrix: Matrix) -> None:
    assert matrix.after["child_pipes"] == matrix.before["child_pipes"] == {
        "pid": matrix.before["child_pipes"]["pid"], "echo": "PING"
    }  # fmt: skip


def test_unix_socketpair_connection_and_listener_work(matrix: Matrix) -> None:
    assert matrix.after["unix"] == {"pair": True, "stream": True, "new_conn": True}


def test_loopback_tcp_connection_comes_back_established(matrix: Matrix) -> None:
    a = matrix.after["tcp_loopback"]
    assert a["same_conn"] and a["new_conn"]  # the dumped connection, and the listener
    assert a["accepted"] == matrix.before["tcp_loopback"]["accepted"] + 1  # no reconnect: one new


def test_external_tcp_connection_comes_back_closed_and_the_workload_reconnects(matrix: Matrix) -> None:
    frozen = matrix.before["tcp_external"]["events"]
    events = matrix.later["tcp_external"]["events"]
    assert events[: len(frozen)] == frozen
    closed, *rest = events[len(frozen) :]
    assert closed in ("eof", "error: Broken pipe"), events  # no connection-reset from a stray RST
    assert rest == ["connected"], events
    new_ip = matrix.restored.endpoint.split(":")[0]
    assert matrix.later["tcp_external"]["local"].startswith(f"{new_ip}:")
    assert matrix.peers[0] == matrix.original.endpoint.split(":")[0] and matrix.peers[-1] == new_ip
    assert matrix.later["tcp_external"]["pings"] > matrix.after["tcp_external"]["pings"]


def test_posix_shared_memory_is_still_shared_with_the_child(matrix: Matrix) -> None:
    a = matrix.after["posix_shm"]
    assert (
        a["seen_by_child"] == f"hello{a['report']:05d}"
        and a["report"] == matrix.before["posix_shm"]["report"] + 1
    )


def test_shared_file_mapping_writes_reach_the_file(matrix: Matrix) -> None:
    assert matrix.after["shared_mapping"] == {"mapping": "mapped-again", "file": "mapped-again"}


def test_unlinked_open_file_keeps_its_contents(matrix: Matrix) -> None:
    assert matrix.after["unlinked_file"] == matrix.before["unlinked_file"]
    assert matrix.after["unlinked_file"]["links"] == 0


def test_append_only_file_written_after_the_freeze_is_appended_to_at_its_end(matrix: Matrix) -> None:
    lines = matrix.log.splitlines()
    if matrix.seam == "host":  # one host file, which the original appended to after the freeze
        assert lines[:3] == ["started", "before-freeze", "after-freeze"] and "restored" in lines[3:], lines
    else:  # a container's writable layer travels as it was at the freeze: the original's own diverges
        assert matrix.original_log.splitlines() == ["started", "before-freeze", "after-freeze"]
        assert lines[:3] == ["started", "before-freeze", "restored"], lines
    assert matrix.after["appended_file"]["offset"] == len(matrix.log.split("restored\n")[0]) + len(
        "restored\n"
    )


def test_signal_handlers_are_installed_and_run(matrix: Matrix) -> None:
    assert matrix.after["signals"] == {"handled": matrix.before["signals"]["handled"] + 1, "handler": True}


def test_monotonic_clock_continues_from_the_freeze_in_a_time_namespace(matrix: Matrix) -> None:
    """CRIU restores the tree into a new time namespace whose offsets continue CLOCK_MONOTONIC and
    CLOCK_BOOTTIME from the dump: the time spent frozen is not counted, on this host or another
    (whose clocks start at its own boot). The jump against the wall clock is that frozen time."""
    b, a = matrix.before["clock"], matrix.after["clock"]
    mono, wall = a["monotonic"] - b["monotonic"], a["wall"] - b["wall"]
    print(
        f"\nmonotonic +{mono:.3f} s, wall +{wall:.3f} s across freeze and restore: jump {mono - wall:+.3f} s"
    )
    assert 0 < mono < wall
    assert abs((a["boottime"] - b["boottime"]) - mono) < 0.01  # both continue alike
    ns = os.stat(f"/proc/{matrix.restored.pid}/ns/time").st_ino
    assert ns != os.stat("/proc/self/ns/time").st_ino  # the restored tree's own time namespace


def test_environment_working_directory_and_pid_are_kept(matrix: Matrix) -> None:
    assert matrix.after["env_cwd"] == matrix.before["env_cwd"]
    assert matrix.after["env_cwd"]["mark"] == "m-42"
    assert matrix.restored.pid != matrix.original.pid or matrix.restored.netns != matrix.original.netns
