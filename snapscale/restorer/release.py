"""Release: stop a replica (kill its tree, free its slot) or suspend it in place (GPU state to
host memory, GPU freed, process kept, counted against the host's RAM budget). A suspend runs the
workload's before_freeze hook first when its spec has after_restore to undo it: weights released
there stay out of RAM and out of the CUDA checkpoint until the resume fills them back.

A CPU sandbox has no GPU state: suspending it stops its processes (SIGSTOP) and frees its CPU slot.
Unknown or already released replicas are a no-op. The caller records the command and acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from snapscale.restorer import events
from snapscale.restorer.budget import Suspended, over_budget
from snapscale.restorer.errors import describe
from snapscale.restorer.host import Host
from snapscale.restorer.inventory import tree_rss_bytes
from snapscale.restorer.replicas import Live
from snapscale.shared import engine
from snapscale.shared.bus import ReleaseCommand, ReleaseMode, ReplicaState
from snapscale.shared.engine import tree_pids

log = logging.getLogger(__name__)


def _signal_tree(lv: Live, sig: signal.Signals) -> None:
    # SIGSTOP/SIGCONT reach a PID-namespace init from outside, handler or not
    for pid in tree_pids(lv.sandbox):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


async def _until_stopped(lv: Live, timeout_s: float = 5.0) -> None:
    """SIGSTOP lands when each process is next scheduled: wait until the whole tree shows it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_proc_state(p) in ("T", "t", "X", "Z") for p in tree_pids(lv.sandbox)):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"sandbox {lv.sandbox.replica} did not stop within {timeout_s:g}s of SIGSTOP")


async def stop_replica(
    h: Host, lv: Live, command_id: str | None, reason: str, *, final: ReplicaState = ReplicaState.STOPPED
) -> None:
    """Kill the tree, free its slot and record it `final`: stopped, or failed for one whose sandbox
    died (deaths.py). While it is being stopped it is `releasing`, which no death watch takes."""
    t = h.tools
    replica = lv.sandbox.replica
    lv.state = ReplicaState.RELEASING
    if final is ReplicaState.STOPPED:
        await events.record(t.bus, events.live_event(t, lv, ReplicaState.RELEASING, command_id, reason))
    try:
        await engine.stop(lv.sandbox)
    finally:
        await t.forwards.close(replica)
        h.replicas.live.pop(replica, None)
        t.slots.free(replica)
        t.registry.remove(replica)
    # a stopped replica's logs go with it (a failed attempt's stay, for whoever debugs it)
    if (d := t.attempt_dir(lv.sandbox.run_dir)) is not None:
        await asyncio.to_thread(shutil.rmtree, d, True)
    await events.record(t.bus, events.live_event(t, lv, final, command_id, reason))
    await events.remove(t.bus, lv.spec.name, replica)


async def suspend_replica(h: Host, lv: Live, command_id: str | None) -> None:
    """Suspend in place; if that fails the replica is stopped instead (and the reason recorded)."""
    t = h.tools
    replica = lv.sandbox.replica
    await events.record(t.bus, events.live_event(t, lv, ReplicaState.RELEASING, command_id, "suspend"))
    try:
        # the workload drops what it can first (its KV cache, its weights: kept out of RAM and of
        # the CUDA checkpoint's copy); the resume brings them back (scaleup._resume)
        await engine.before_suspend(lv.sandbox, lv.spec)
        if lv.sandbox.gpu_uuids:
            await engine.suspend(lv.sandbox)
        else:
            _signal_tree(lv, signal.SIGSTOP)
            await _until_stopped(lv)
    except Exception as e:
        reason = f"suspend failed, stopped instead: {describe(e)}"
        log.warning("replica %s: %s", replica, reason)
        await stop_replica(h, lv, command_id, reason)
        return
    t.slots.free(replica)
    lv.state = ReplicaState.SUSPENDED
    lv.since = t.now()
    lv.rss_bytes = tree_rss_bytes(lv.sandbox.pid)
    await events.record(t.bus, events.live_event(t, lv, ReplicaState.SUSPENDED, command_id))
    await enforce_budget(h)


async def enforce_budget(h: Host) -> None:
    """Stop the oldest suspended replicas until the rest fit the suspend RAM budget."""
    suspended = [
        Suspended(lv.sandbox.replica, lv.since, lv.rss_bytes)
        for lv in h.replicas.live.values()
        if lv.state is ReplicaState.SUSPENDED
    ]
    budget = h.tools.config.suspend_budget_bytes
    for replica in over_budget(suspended, budget):
        lv = h.replicas.live[replica]
        reason = f"suspend budget {budget} bytes exceeded: oldest suspended stopped"
        log.info("replica %s: %s", replica, reason)
        await stop_replica(h, lv, None, reason)


async def release(h: Host, cmd: ReleaseCommand) -> str:
    """Handle a release command; returns the outcome for the ledger."""
    r = h.replicas
    task = r.starting.get(cmd.replica)
    if task is not None and not task.done():
        # released while still coming up: the scale-up cleans up what it started and reports failed
        r.cancelled_by_release.add(cmd.replica)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    lv = r.live.get(cmd.replica)
    if lv is None or lv.spec.name != cmd.deployment:
        log.info("release of %s.%s: not here (already released?): nothing to do", cmd.deployment, cmd.replica)
        return "not here: no-op"
    if lv.state is ReplicaState.SUSPENDED:
        if cmd.mode is ReleaseMode.SUSPEND:
            return "already suspended: no-op"
        await stop_replica(h, lv, cmd.id, "released while suspended")
        return "stopped"
    if lv.state is not ReplicaState.READY:
        return f"{lv.state.value}: no-op"
    if cmd.mode is ReleaseMode.SUSPEND:
        await suspend_replica(h, lv, cmd.id)
        return "suspended" if cmd.replica in r.live else "stopped (suspend failed)"
    await stop_replica(h, lv, cmd.id, "released")
    return "stopped"


def wake(lv: Live) -> None:
    """Let a suspended CPU sandbox run again (the GPU path resumes through the engine)."""
    if not lv.sandbox.gpu_uuids:
        _signal_tree(lv, signal.SIGCONT)
