"""Finding and ending what a cut-short restore or boot left behind: processes holding files of
its run dir (the sandbox log), everything else in their network namespace, and that namespace.

Only processes tied to the given run dir are touched; other replicas on the host are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from snapscale.shared.engine import (
    delete_netns,
    existing_netns,
    netns_inode,
    pid_alive,
    pids_holding,
    pids_in_netns,
)

log = logging.getLogger(__name__)


def _net_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


async def _gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # /proc has no event to wait on
        if not any(pid_alive(p) for p in pids):
            return
        await asyncio.sleep(0.02)


async def reap(run_dir: Path, *, extra_netns: list[str] | None = None, timeout_s: float = 10.0) -> list[int]:
    """Kill every process tied to `run_dir` and the snapscale netns they live in; the PIDs killed."""
    pids = set(await asyncio.to_thread(pids_holding, run_dir))
    inodes = {i for i in (_net_inode(p) for p in pids) if i is not None}
    names = set(extra_netns or [])
    for ns in existing_netns():
        try:
            if netns_inode(ns.name) in inodes:
                names.add(ns.name)
        except OSError:
            continue
    for name in names:
        pids |= set(pids_in_netns(name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a PID-namespace init ignores an unhandled SIGTERM
    await _gone(pids, timeout_s)
    for name in names:
        try:
            await delete_netns(name)
        except Exception as e:  # tidying: a namespace that will not go is logged, not fatal
            log.warning("could not delete netns %s: %s", name, e)
    if pids:
        log.warning("reaped %d leftover processes of %s: %s", len(pids), run_dir, sorted(pids))
    return sorted(pids)
