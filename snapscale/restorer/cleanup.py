"""Finding and ending what a cut-short restore or boot left behind: processes holding files of
its run dir (the sandbox log) or image dir, everything else in their network namespace, and that
namespace; at start, the namespaces this restorer's run dirs own that no live sandbox uses.

Only processes tied to the given dirs or namespaces are touched; other replicas on the host are not.
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

from snapscale.shared.engine import (
    container_pids,
    delete_netns,
    existing_netns,
    netns_inode,
    netns_owner,
    pid_alive,
    pids_holding,
    pids_in_netns,
    sweep_containers,
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
    """Kill every process tied to `run_dir` (an OCI sandbox's by its runc state) and the snapscale
    netns they live in; the PIDs killed."""
    pids = set(await asyncio.to_thread(pids_holding, run_dir)) | set(container_pids(run_dir))
    inodes = {i for i in (_net_inode(p) for p in pids) if i is not None}
    names = set(extra_netns or [])
    for ns in existing_netns():
        try:
            if netns_inode(ns.name) in inodes:
                names.add(ns.name)
        except OSError:
            continue
    killed = await _end(pids, sorted(names), timeout_s)
    if killed:
        log.warning("reaped %d leftover processes of %s: %s", len(killed), run_dir, killed)
    if gone := await sweep_containers(run_dir):  # an OCI sandbox's runc state and overlay
        log.warning("removed leftover containers and mounts of %s: %s", run_dir, gone)
    return killed


async def _end(pids: set[int], netns: list[str], timeout_s: float) -> list[int]:
    """SIGKILL `pids` and everything inside `netns`, wait for them, then remove the namespaces."""
    for name in netns:
        pids |= set(pids_in_netns(name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a PID-namespace init ignores an unhandled SIGTERM
    await _gone(pids, timeout_s)
    for name in netns:
        try:
            await delete_netns(name)
        except Exception as e:  # tidying: a namespace that will not go is logged, not fatal
            log.warning("could not delete netns %s: %s", name, e)
    return sorted(pids)


def owned_netns(run_root: Path, keep: set[str]) -> list[str]:
    """The snapscale network namespaces made for a sandbox under `run_root` (this restorer's run
    dirs), less `keep`. Namespaces are host-wide: another restorer's, or one that names no owner,
    are never listed."""
    root = run_root.resolve()
    out = []
    for ns in existing_netns():
        owner = netns_owner(ns.name)
        if ns.name not in keep and owner is not None and (owner == root or root in owner.parents):
            out.append(ns.name)
    return sorted(out)


async def sweep(dirs: list[Path], netns: list[str], timeout_s: float = 10.0) -> list[int]:
    """Kill every process tied to `dirs` (image or run dirs a crash left) or inside `netns`, remove
    those namespaces, then the dirs; the PIDs killed."""
    pids: set[int] = set()
    for d in dirs:
        pids |= set(await asyncio.to_thread(pids_holding, d)) | set(container_pids(d))
    killed = await _end(pids, netns, timeout_s)
    for d in dirs:
        await sweep_containers(d)  # before the dir goes: never delete through a mounted overlay
        await asyncio.to_thread(shutil.rmtree, d, True)
    return killed
