"""One OCI replica: launch (`runc run`), checkpoint (`runc checkpoint`), restore (`runc restore`),
stop (`runc delete`), and why it died.

The bundle lives in the replica's run dir (rootfs.py): `bundle/config.json` (config.py) and
`bundle/rootfs`, an overlay of the image's unpacked rootfs (images.py, shared) under the replica's
own `upper/`; a restore's root is prepared while its netns is made (`prepare_restore`). The
container's stdio are pipes, never host files (CRIU could not reopen a host path inside the
container's mount namespace): stdin a pipe at EOF, stdout and stderr one pipe into a relay (`cat`)
that appends to the replica's log; runc hands the restored tree its new pipes (descriptors.json).
The upper layer travels in the checkpoint as `rootfs-upper.tar` in the image dir, so it is chunked
and deduplicated like memory, and unpacked into a fresh upper at restore, on any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine import netns
from snapscale.shared.engine.criu import CriuRun, read_stats
from snapscale.shared.engine.errors import CriuError, EngineError
from snapscale.shared.engine.mountinfo import SELF, mount_points
from snapscale.shared.engine.oci import runc
from snapscale.shared.engine.oci.config import MIB
from snapscale.shared.engine.oci.rootfs import (
    UPPER_TAR,
    Root,
    cgroups_path,
    layer,
    mkdirs,
    prepare,
    write_bundle,
)
from snapscale.shared.engine.sandbox import (
    LOG_NAME,
    Sandbox,
    become_subreaper,
    booted,
    open_log,
)

log = logging.getLogger(__name__)
_relays: dict[int, asyncio.Future[None]] = {}  # the log relays' waits, kept so they are reaped


CAP_SYS_RESOURCE = 24


def has_cap(cap: int, status: str) -> bool:
    """Whether the `CapEff:` line of a /proc/<pid>/status text holds `cap`. Pure."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _check_dumpable(sb: Sandbox) -> None:
    """CRIU reads every task's rlimits (prlimit): for a task of another uid the kernel asks for
    CAP_SYS_RESOURCE, which the root of some hosts (containers, this project's dev VMs) lacks."""
    try:
        uid = os.stat(f"/proc/{sb.pid}").st_uid
        mine = Path("/proc/self/status").read_text()
    except OSError:
        return  # the dump says what is wrong
    if uid != os.getuid() and not has_cap(CAP_SYS_RESOURCE, mine):
        raise CriuError(
            "criu_dump",
            f"this host's root lacks CAP_SYS_RESOURCE, so CRIU cannot read the rlimits of the workload's "
            f"uid {uid}: give the restorer that capability, or run the workload as sandbox.user 0:0 "
            "(docs/sandbox.md)",
        )


def _is_mount(p: Path) -> bool:
    return os.path.ismount(p)


async def _forget_relay(relay: asyncio.subprocess.Process) -> None:
    await relay.wait()
    _relays.pop(relay.pid, None)


@contextlib.asynccontextmanager
async def _stdio(log_path: Path) -> AsyncIterator[tuple[int, int, int]]:
    """(stdin, stdout, stderr) for runc run/restore: pipes, the output relayed into the log."""
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    os.close(in_w)  # the workload reads EOF
    log_fd = open_log(log_path)
    try:
        relay = await asyncio.create_subprocess_exec(
            "cat", stdin=out_r, stdout=log_fd, stderr=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        _relays[relay.pid] = asyncio.ensure_future(_forget_relay(relay))
        yield in_r, out_w, out_w
    finally:
        for fd in (out_r, in_r, out_w, log_fd):
            os.close(fd)


async def launch(spec: DeploymentSpec, replica: str, *, gpu_uuids: list[str], run_dir: Path) -> Sandbox:
    """Cold boot: netns, bundle, `runc run --detach`; returns once the container's init runs."""
    log_path = run_dir / LOG_NAME
    mkdirs(run_dir)
    become_subreaper()  # the container's init outlives `runc run`: ours to reap when it dies
    ns = await netns.create(replica, owner=run_dir)
    pidfile = run_dir / "container.pid"
    try:
        bundle = write_bundle(
            spec, replica, await prepare(spec, run_dir, gpu_uuids, None), ns.path, gpu_uuids
        )
        async with _stdio(log_path) as fds:
            await runc.call(runc.run_argv(runc.runc_path(), replica, bundle, pidfile), "launch", stdio=fds)
        pid = int(pidfile.read_text())
    except BaseException:
        await _teardown(replica, run_dir)
        await netns.delete_netns(ns.name)
        raise
    return booted(
        spec, replica, pid, ns, gpu_uuids=gpu_uuids, log_path=log_path, run_dir=run_dir, container=replica
    )


async def checkpoint(sb: Sandbox, image_dir: Path, *, leave_running: bool, criu: str) -> CriuRun:
    """`runc checkpoint` into `image_dir`, then the writable layer beside CRIU's files."""
    _check_dumpable(sb)
    work = Path(sb.run_dir) / f"criu-dump-{int(time.time() * 1000)}"
    mkdirs(image_dir)
    argv = runc.checkpoint_argv(
        runc.runc_path(), criu, sb.container, image_dir, work, leave_running=leave_running
    )
    upper = Path(sb.run_dir) / "upper"
    if not leave_running:  # nothing runs after the dump: the layer is as CRIU left it
        seconds = await runc.call(argv, "criu_dump", log=work / "dump.log")
        await layer(upper, image_dir / UPPER_TAR, pack=True, step="criu_dump")
        return CriuRun(seconds=seconds, stats=read_stats(work, "dump"))
    # Kept running: the layer is packed while the cgroup stays frozen, so the files travel as the
    # memory saw them (a file the workload changed after a --leave-running dump could fail the
    # restore on CRIU's size check); the checkpoint leaves a paused container paused.
    await runc.call(runc.pause_argv(runc.runc_path(), sb.container, pause=True), "criu_dump")
    try:
        seconds = await runc.call(argv, "criu_dump", log=work / "dump.log")
        await layer(upper, image_dir / UPPER_TAR, pack=True, step="criu_dump")
    finally:
        await runc.call(runc.pause_argv(runc.runc_path(), sb.container, pause=False), "criu_dump")
    return CriuRun(seconds=seconds, stats=read_stats(work, "dump"))


async def prepare_restore(spec: DeploymentSpec, image_dir: Path, run_dir: Path, gpu_uuids: list[str]) -> Root:
    """The root a restore of `image_dir` runs in (rootfs.prepare), its writable layer from the
    image; undone, on failure, with `discard`."""
    try:
        return await prepare(spec, run_dir, gpu_uuids, image_dir / UPPER_TAR)
    except BaseException:
        await discard(run_dir)
        raise


async def discard(run_dir: Path) -> None:
    """A prepared root no container was restored into: its overlay unmounted."""
    await _teardown("", run_dir)


async def restore(
    spec: DeploymentSpec,
    image_dir: Path,
    replica: str,
    *,
    root: Root,
    gpu_uuids: list[str],
    run_dir: Path,
    ns: netns.NetNs,
    criu: str,
) -> CriuRun:
    """`runc restore --detach` as `replica` in `ns`, in `root` (`prepare_restore`)."""
    work = run_dir / f"criu-restore-{int(time.time() * 1000)}"
    pidfile = run_dir / "container.pid"
    pidfile.unlink(missing_ok=True)
    try:
        bundle = write_bundle(spec, replica, root, ns.path, gpu_uuids)
        argv = runc.restore_argv(runc.runc_path(), criu, replica, bundle, image_dir, work, pidfile)
        async with _stdio(run_dir / LOG_NAME) as fds:
            seconds = await runc.call(argv, "criu_restore", stdio=fds, log=work / "restore.log")
        pid = int(pidfile.read_text())
        log.info("restored container %s: runc restore %.3fs", replica, seconds)
    except BaseException:
        await _teardown(replica, run_dir)
        raise
    return CriuRun(seconds=seconds, stats=read_stats(work, "restore"), pid=pid)


async def _teardown(cid: str, run_dir: Path) -> None:
    """Forget the container `cid` (runc state, cgroups; none: "") and unmount its root. Idempotent."""
    if cid:
        with contextlib.suppress(EngineError):
            await runc.call(runc.delete_argv(runc.runc_path(), cid), "stop")
    rootfs = run_dir / "bundle" / "rootfs"
    if _is_mount(rootfs):
        with contextlib.suppress(EngineError):
            await runc.tool("umount", "--lazy", str(rootfs), step="stop")


async def stop(sb: Sandbox) -> None:
    """After the host sandbox's stop (tree killed, netns gone): runc's state, cgroup and the overlay."""
    await _teardown(sb.container, Path(sb.run_dir))


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(f"{root}/")


def _containers(root: Path) -> dict[str, int]:
    """runc containers whose bundle lies under `root`: id -> host PID of their init (0: none)."""
    out: dict[str, int] = {}
    for state in Path(runc.STATE_ROOT).glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            d = json.loads(state.read_text())
            if _under(str(d["config"]["rootfs"]), root):
                out[state.parent.name] = int(d.get("init_process_pid") or 0)
    return out


def init_pids(root: Path) -> list[int]:
    """Host PIDs of the inits of containers under `root`: a pivoted root hides them from a search of
    open files and working dirs (procs.pids_holding); the kernel ends a PID namespace with its init."""
    return [p for p in _containers(root).values() if p > 0]


def _leftovers(root: Path) -> tuple[list[str], list[str]]:
    """runc containers whose bundle lies under `root`, and the mounts under it (deepest first)."""
    cids = list(_containers(root))
    try:
        points = mount_points(SELF.read_text())
    except OSError:
        points = []
    return cids, sorted([t for t in points if _under(t, root)], key=len, reverse=True)


async def sweep(root: Path) -> list[str]:
    """What a crash left of containers under `root` (a run dir, or the run root at start): their
    runc state and cgroups, their overlay mounts. Their processes are the caller's to kill first.
    The container ids and mount points removed."""
    cids, mounts = await asyncio.to_thread(_leftovers, root)
    for cid in cids:
        with contextlib.suppress(EngineError):
            await runc.call(runc.delete_argv(runc.runc_path(), cid), "stop")
    for target in mounts:
        with contextlib.suppress(EngineError):
            await runc.tool("umount", "--lazy", target, step="stop")
    return [*cids, *mounts]


def exit_reason(sb: Sandbox) -> str | None:
    """Why a dead container died, when its cgroup says: the OOM killer (cgroup v1 or v2)."""
    rel = cgroups_path(sb.container).lstrip("/")
    limit = None
    for events, key, lim in (
        (Path("/sys/fs/cgroup/memory") / rel / "memory.oom_control", "oom_kill", "memory.limit_in_bytes"),
        (Path("/sys/fs/cgroup") / rel / "memory.events", "oom_kill", "memory.max"),
    ):
        try:
            fields = dict(line.split() for line in events.read_text().splitlines() if len(line.split()) == 2)
        except OSError:
            continue
        if int(fields.get(key, "0")) > 0:
            with contextlib.suppress(OSError, ValueError):
                limit = int((events.parent / lim).read_text()) // MIB
            return f"out of memory: limit {limit} MiB" if limit is not None else "out of memory"
    return None
