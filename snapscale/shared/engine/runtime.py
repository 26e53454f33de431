"""The seam between the engine and the sandbox that holds a replica: an OCI container run by runc
(engine/oci/, the default) or a host-process sandbox (engine/sandbox.py), which runs only on a
host in development mode (`SNAPSCALE_SANDBOX=host`). Launch, dump, restore, stop and the reason a
sandbox died go through here; lifecycle.py does the rest (hooks, CUDA, readiness) for both alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine import criu as criu_mod
from snapscale.shared.engine import extfiles, netns, sandbox
from snapscale.shared.engine.criu import CriuBinary, CriuRun
from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.oci import container
from snapscale.shared.engine.sandbox import Sandbox

MODE_ENV = "SNAPSCALE_SANDBOX"
HOST_MODE = "host"


def host_mode() -> bool:
    """This host runs host-process sandboxes (development mode): `SNAPSCALE_SANDBOX=host`."""
    return os.environ.get(MODE_ENV, "oci") == HOST_MODE


def check_runnable(spec: DeploymentSpec, step: str) -> None:
    """A spec without an image runs only in development mode; refused otherwise, saying why."""
    if spec.sandbox.image is None and not host_mode():
        raise EngineError(
            step,
            f"deployment {spec.name} names no sandbox.image; host-process sandboxes run only on a "
            f"host in development mode ({MODE_ENV}={HOST_MODE}); see docs/sandbox.md",
        )


async def launch(spec: DeploymentSpec, replica: str, *, gpu_uuids: list[str], run_dir: Path) -> Sandbox:
    check_runnable(spec, "launch")
    if spec.sandbox.image is not None:
        return await container.launch(spec, replica, gpu_uuids=gpu_uuids, run_dir=run_dir)
    return await sandbox.launch(spec, replica, gpu_uuids=gpu_uuids, run_dir=run_dir)


def outside_files(sb: Sandbox) -> list[str]:
    """CRIU's keys of the files the sandbox holds from outside its mount namespace: a restored
    host-process sandbox's stdio log (extfiles.py); none for a container, whose stdio are pipes."""
    return [] if sb.container else extfiles.outside_keys(sandbox.tree_pids(sb), sb.log_path)


async def dump(
    sb: Sandbox,
    image_dir: Path,
    *,
    criu: CriuBinary,
    leave_running: bool,
    log_path: Path,
    external_files: list[str],
) -> CriuRun:
    """`external_files`: `outside_files(sb)`, as the caller recorded it in the image's meta."""
    if sb.container:
        criu_mod.require_version(criu)
        return await container.checkpoint(sb, image_dir, leave_running=leave_running, criu=criu.path)
    argv = criu_mod.dump_argv(
        criu,
        sb.pid,
        image_dir,
        netns_inode=netns.netns_inode(sb.netns),
        leave_running=leave_running,
        log_path=log_path,
        external_files=external_files,
    )
    return await criu_mod.dump(criu, argv, image_dir, log_path)


async def restore_tree(
    spec: DeploymentSpec,
    image_dir: Path,
    replica: str,
    *,
    log_key: str,
    gpu_uuids: list[str],
    run_dir: Path,
    ns: netns.NetNs,
    criu: CriuBinary,
    log_level: int,
) -> CriuRun:
    """Restore the frozen tree into `ns` (made by the caller); `log_key` is CRIU's name for the
    host sandbox's frozen log file (its path, or its external key), replaced by the new replica's log."""
    check_runnable(spec, "restore")
    if spec.sandbox.image is not None:
        criu_mod.require_version(criu)
        return await container.restore(
            spec, image_dir, replica, gpu_uuids=gpu_uuids, run_dir=run_dir, ns=ns, criu=criu.path
        )
    log_fd = sandbox.open_log(run_dir / sandbox.LOG_NAME)
    ns_fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return await criu_mod.restore(
            criu,
            image_dir,
            inherit={criu_mod.EXTNET_KEY: ns_fd, log_key: log_fd},
            log_path=run_dir / f"criu-restore-{int(time.time() * 1000)}.log",
            pidfile=run_dir / "criu-restore.pid",
            log_level=log_level,
        )
    finally:
        os.close(log_fd)
        os.close(ns_fd)


async def stop(sb: Sandbox, *, timeout_s: float = 10.0) -> None:
    """Kill the tree, remove its netns; for a container also runc's state, cgroup and overlay."""
    await sandbox.stop(sb, timeout_s=timeout_s)
    if sb.container:
        await container.stop(sb)


def container_pids(root: Path) -> list[int]:
    """The inits of OCI sandboxes under `root` (run dirs), for a cleanup to kill."""
    return container.init_pids(root)


async def sweep(root: Path) -> list[str]:
    """Containers and overlay mounts a crash left under `root` (engine/oci/container.py)."""
    return await container.sweep(root)


def exit_reason(sb: Sandbox) -> str | None:
    """Why a dead sandbox died, when the system recorded it (a container's OOM kill)."""
    return container.exit_reason(sb) if sb.container else None
