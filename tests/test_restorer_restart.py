"""The restorer killed (SIGKILL) and restarted: a restore it was in the middle of leaves no
orphan process and is reported failed; a replica it had brought up is re-adopted and serves on.
The service runs as `snapscale restorer` in a subprocess here."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from engine_helpers import kill_tagged, procs_with
from restorer_harness import Harness, follow, get, procs, spawn

from snapscale.shared import bus
from snapscale.shared.bus.messages import ReleaseMode, ReplicaEvent, ReplicaState, Tier, decode_message
from snapscale.shared.bus.spec import ReadySpec
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import netns, sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.registry import SandboxRegistry

pytestmark = pytest.mark.criu
__all__ = ["procs"]  # fixtures


@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"rkill-{uuid.uuid4().hex[:10]}"
    harness = Harness(settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def until(cond: object, timeout_s: float = 30.0) -> None:
    assert callable(cond)
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout_s}s")


async def test_killed_mid_restore_leaves_no_orphan_and_reports_failed(
    h: Harness, procs: list[subprocess.Popen[bytes]]
) -> None:
    # a restored replica that waits for a file nobody makes: the restore hangs in its ready probe
    flag = h.tmp / "ready-flag"
    spec = h.spec(ready=ReadySpec(http_path=None, file=str(flag), timeout_s=120.0, interval_s=0.05))
    spec = replace(spec, command=["sh", "-c", f'touch {flag}; exec "$0" "$@"', *spec.command])
    await h.deploy(spec)
    frozen = await h.make_checkpoint(spec)
    flag.unlink()
    assert procs_with(h.tag) == []

    log = h.tmp / "restorer.log"
    procs.append(spawn(h.settings, h.criu, log))
    cmd = await h.restore(spec.name, "r1", deadline_s=300)
    ev = await h.wait("r1", frozenset({ReplicaState.RESTORING}))
    assert ev.checkpoint_id == frozen.entry.checkpoint_id
    await until(lambda: procs_with(h.tag) != [])  # CRIU has brought the tree back: mid-restore
    await asyncio.sleep(0.3)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)
    orphans = procs_with(h.tag)
    assert orphans != []  # the half-restored tree outlived its restorer
    its_net = os.stat(f"/proc/{orphans[0]}/ns/net").st_ino
    (ns_name,) = [n.name for n in netns.existing_netns() if netns.netns_inode(n.name) == its_net]

    n = len(h.events)
    procs.append(spawn(h.settings, h.criu, log))
    failed = await h.wait("r1", frozenset({ReplicaState.FAILED}), after=n)
    assert failed.command_id == cmd.id
    assert "restarted mid-restore" in failed.reason
    await until(lambda: procs_with(h.tag) == [], timeout_s=10)
    assert ns_name not in [n.name for n in netns.existing_netns()]  # its network namespace went too
    # the command, redelivered to the new process, is not run again
    await asyncio.sleep(1.0)
    assert [e.state for e in h.of("r1")[n:]] == [ReplicaState.FAILED], log.read_text()[-3000:]


async def test_killed_after_ready_re_adopts_the_replica(
    h: Harness, procs: list[subprocess.Popen[bytes]]
) -> None:
    spec = await h.deploy(h.spec())
    log = h.tmp / "restorer.log"
    procs.append(spawn(h.settings, h.criu, log))
    await h.restore(spec.name, "r1")
    ev = await h.wait("r1", timeout_s=60)
    assert ev.state is ReplicaState.READY and ev.tier is Tier.COLD
    sb = SandboxRegistry(h.settings.state_dir).get("r1")
    assert sb is not None and sandbox.is_running(sb)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)

    n = len(h.events)
    procs.append(spawn(h.settings, h.criu, log))
    back = await h.wait("r1", after=n, timeout_s=60)
    assert back.state is ReplicaState.READY, back.reason
    assert back.reason == "re-adopted after a restorer restart"
    assert back.endpoint == ev.endpoint and back.tier is Tier.COLD
    assert sandbox.is_running(sb)  # the very same process
    # on the stream too (a JetStream consumer such as the scaler sees it), not only on the wire
    # (core subscribers may hear of it a moment before the stream has stored it)
    stored = ""
    for _ in range(40):
        last = await h.bus.js.get_last_msg(h.bus.subjects.evt_stream, h.bus.subjects.evt_replica(spec.name))
        assert last.data is not None
        stored = decode_message(last.data, ReplicaEvent).reason
        if stored == "re-adopted after a restorer restart":
            break
        await asyncio.sleep(0.05)
    assert stored == "re-adopted after a restorer restart"
    await get(back.endpoint, "/generate")

    # and it is this restorer's to release
    await h.release(spec.name, "r1", ReleaseMode.STOP)
    await h.wait("r1", frozenset({ReplicaState.STOPPED}), after=n)
    await until(lambda: not sandbox.is_running(sb), timeout_s=10)
