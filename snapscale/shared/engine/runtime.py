"""The seam between the engine and the sandbox that holds a replica: an OCI container run by runc
(engine/oci/, the default) or a host-process sandbox (engine/sandbox.py), which runs only on a
host in development mode (`SNAPSCALE_SANDBOX=host`). Launch, dump, restore, stop and the reason a
sandbox died go through here; lifecycle.py does the rest (hooks, CUDA, readiness) for both alike.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine import criu as criu_mod
from snapscale.shared.engine import extfiles, netns, sandbox
from snapscale.shared.engine.criu import CriuBinary, CriuRun
from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.oci import container
from snapscale.shared.engine.oci.rootfs import Root
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


@dataclass(frozen=True)
class Prepared:
    """Where a restore's tree comes back: its fresh network namespace and, for an OCI sandbox, its
    root (the image's overlay with the checkpoint's writable layer; None for a host-process one)."""

    ns: netns.NetNs
    root: Root | None


async def prepare_restore(
    spec: DeploymentSpec, image_dir: Path, replica: str, *, gpu_uuids: list[str], run_dir: Path
) -> Prepared:
    """The netns and a container's root, made at once: neither needs the other, and the root (the
    writable layer's unpack, the overlay, the host's GPUs) sat after the netns on the critical path.
    Neither is cancelled half-way (a half-made netns would be left): on a failure or a cancellation
    both run to their end and what was made is undone."""
    check_runnable(spec, "restore")
    if spec.sandbox.image is None:
        return Prepared(await netns.create(replica, owner=run_dir), None)
    ns_task = asyncio.ensure_future(netns.create(replica, owner=run_dir))
    root_task = asyncio.ensure_future(container.prepare_restore(spec, image_dir, run_dir, gpu_uuids))
    both = asyncio.gather(ns_task, root_task, return_exceptions=True)
    try:
        ns, root = await asyncio.shield(both)
    except asyncio.CancelledError:
        await both
        await _undo(ns_task, root_task, run_dir)
        raise
    for got in (ns, root):
        if isinstance(got, BaseException):
            await _undo(ns_task, root_task, run_dir)
            raise got
    assert isinstance(ns, netns.NetNs) and isinstance(root, Root)
    return Prepared(ns, root)


async def _undo(ns_task: asyncio.Future[netns.NetNs], root_task: asyncio.Future[Root], run_dir: Path) -> None:
    """What a failed or cancelled `prepare_restore` made (a root that failed undid itself)."""
    if ns_task.exception() is None:
        await netns.delete_netns(ns_task.result().name)
    if root_task.exception() is None:
        await container.discard(run_dir)


async def discard(prepared: Prepared, run_dir: Path) -> None:
    """A prepared root that no tree was restored into (the netns is the caller's to remove)."""
    if prepared.root is not None:
        await container.discard(run_dir)


async def restore_tree(
    spec: DeploymentSpec,
    image_dir: Path,
    replica: str,
    *,
    prepared: Prepared,
    log_key: str,
    gpu_uuids: list[str],
    run_dir: Path,
    criu: CriuBinary,
    log_level: int,
) -> CriuRun:
    """Restore the frozen tree into `prepared` (`prepare_restore`); `log_key` is CRIU's name for the
    host sandbox's frozen log file (its path, or its external key), replaced by the new replica's log."""
    check_runnable(spec, "restore")
    ns = prepared.ns
    if prepared.root is not None:
        criu_mod.require_version(criu)
        return await container.restore(
            spec,
            image_dir,
            replica,
            root=prepared.root,
            gpu_uuids=gpu_uuids,
            run_dir=run_dir,
            ns=ns,
            criu=criu.path,
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


FROZEN_MARK = "stopped-by-freeze"  # in the run dir: the tree ended as a freeze's last step


def mark_stopped_by_freeze(sb: Sandbox, image_dir: Path) -> None:
    """Say, in the sandbox's run dir, that a freeze ended it on purpose (the image it went into), so
    a watch on the replica reports it stopped, not failed."""
    if sb.run_dir:
        (Path(sb.run_dir) / FROZEN_MARK).write_text(str(image_dir))


def stopped_by_freeze(sb: Sandbox) -> bool:
    return bool(sb.run_dir) and (Path(sb.run_dir) / FROZEN_MARK).exists()


def exit_reason(sb: Sandbox) -> str | None:
    """Why a dead sandbox died, when the system recorded it (a container's OOM kill)."""
    return container.exit_reason(sb) if sb.container else None
