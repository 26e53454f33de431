"""The sandbox: a deployment's process tree as PID 1 of its own PID namespace inside its own netns.

Launch = `nsenter --net=<netns> unshare --pid --fork setsid <command>`, stdio on a per-replica log.
Stop = SIGKILL to the namespace's init (the kernel kills the rest), then the netns goes. No CRIU here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine import netns, procs
from snapscale.shared.engine.errors import EngineError, SandboxExited

log = logging.getLogger(__name__)

LOG_NAME = "sandbox.log"
# The workload gets a clean environment (the agent's holds secrets such as the signing key).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class Sandbox:
    replica: str
    deployment: str
    pid: int  # host PID of the sandbox's init (PID 1 of its own PID namespace)
    netns: str  # name under /run/netns
    endpoint: str  # "10.213.x.y:PORT", reachable from the host (events call it `local_endpoint`)
    gpu_uuids: list[str] = field(default_factory=list)
    log_path: str = ""
    started_at: float = 0.0  # wall clock, seconds
    checkpoint_id: str | None = None  # None: cold-booted
    run_dir: str = ""
    host_port: int | None = None  # the host port forwarded to `endpoint` (forward.py); None: none
    container: str = ""  # the runc container id of an OCI sandbox (engine/oci/); "": a host-process one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sandbox:
        try:
            return cls(
                replica=str(d["replica"]),
                deployment=str(d["deployment"]),
                pid=int(d["pid"]),
                netns=str(d["netns"]),
                endpoint=str(d["endpoint"]),
                gpu_uuids=[str(u) for u in d.get("gpu_uuids", [])],
                log_path=str(d.get("log_path", "")),
                started_at=float(d.get("started_at", 0.0)),
                checkpoint_id=None if d.get("checkpoint_id") is None else str(d["checkpoint_id"]),
                run_dir=str(d.get("run_dir", "")),
                host_port=None if d.get("host_port") is None else int(d["host_port"]),
                container=str(d.get("container", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EngineError("sandbox", f"malformed sandbox record: {e!r}") from None

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    def with_gpus(self, gpu_uuids: list[str]) -> Sandbox:
        return replace(self, gpu_uuids=list(gpu_uuids))


def workload_env(spec: DeploymentSpec, gpu_uuids: list[str]) -> dict[str, str]:
    """The environment the workload starts with. Pure."""
    env = dict(BASE_ENV)
    env.update(spec.env)
    # UUIDs rather than indices: they name the same card whatever the enumeration order.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_uuids)
    return env


def uses_pid_namespace(spec: DeploymentSpec) -> bool:
    """Every sandbox is PID 1 of its own PID namespace, with its own mount namespace. Pure.

    The mount namespace is there for CUDA: it fails to initialise (error 304) in a PID namespace
    whose /proc is the host's, so the sandbox mounts its own /proc (`--mount-proc`). CRIU dumps
    the copied host mounts as external (`--external mnt[]`) and binds them back at restore.
    """
    return True


# Runs as PID 1 of the new namespaces with the agent's interpreter, then execs the workload.
INIT = str(Path(__file__).with_name("sandbox_init.py"))


def launch_argv(
    spec: DeploymentSpec,
    ns_path: Path,
    log_path: Path,
    which: Callable[[str], str] = str,
    python: str = "python3",
) -> list[str]:
    """Pure. `which` resolves the launcher's own tools: they are exec'd with the workload's
    environment, whose PATH is the spec's business. No `unshare --kill-child`: its parent-death
    signal would kill a restored tree when CRIU exits.
    """
    nsenter = [which("nsenter"), f"--net={ns_path}"]
    if not uses_pid_namespace(spec):
        return [*nsenter, which("setsid"), *spec.command]
    ns = [which("unshare"), "--pid", "--mount", "--fork", "--mount-proc", "--propagation", "private"]
    return [*nsenter, *ns, python, "-I", "-S", INIT, str(log_path), *spec.command]


def _which(tool: str) -> str:
    return shutil.which(tool) or tool


async def launch(spec: DeploymentSpec, replica: str, *, gpu_uuids: list[str], run_dir: Path) -> Sandbox:
    """Cold-boot start: make the netns, start the tree, return once its init's host PID is known."""
    log_path = run_dir / LOG_NAME
    log_fd = open_log(log_path)
    try:
        ns = await netns.create(replica, owner=run_dir)
    except BaseException:
        os.close(log_fd)
        raise
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *launch_argv(spec, ns.path, log_path, _which, sys.executable),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=spec.cwd,
                env=workload_env(spec, gpu_uuids),
            )
        finally:
            os.close(log_fd)
        _launched[proc.pid] = proc
        # nsenter and setsid exec in place; `unshare --fork` makes the namespace's init its child.
        pid = await _child_of(proc.pid, log_path) if uses_pid_namespace(spec) else proc.pid
        await _entered(pid, ns, log_path)
    except BaseException:
        await netns.delete_netns(ns.name)
        raise
    sb = booted(spec, replica, pid, ns, gpu_uuids=gpu_uuids, log_path=log_path, run_dir=run_dir)
    log.info("launched %s (%s) pid %d at %s", replica, spec.name, pid, sb.endpoint)
    return sb


def booted(
    spec: DeploymentSpec,
    replica: str,
    pid: int,
    ns: netns.NetNs,
    *,
    gpu_uuids: list[str],
    log_path: Path,
    run_dir: Path,
    container: str = "",
) -> Sandbox:
    """The record of a cold-booted sandbox whose init runs as host `pid` in `ns`."""
    return Sandbox(
        replica=replica,
        deployment=spec.name,
        pid=pid,
        netns=ns.name,
        endpoint=f"{ns.sandbox_ip}:{spec.port}",
        gpu_uuids=list(gpu_uuids),
        log_path=str(log_path),
        started_at=time.time(),
        run_dir=str(run_dir),
        container=container,
    )


def open_log(path: Path) -> int:
    """A fresh append-only log fd for a replica's stdio (its run dir is made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


async def _child_of(unshare_pid: int, log_path: Path, timeout_s: float = 10.0) -> int:
    """The PID-namespace init is the only child `unshare --fork` makes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = _children(unshare_pid)
        if text:
            return int(text[0])
        if not procs.pid_alive(unshare_pid):
            raise SandboxExited("launch", "the sandbox exited at once", log_tail(log_path))
        await asyncio.sleep(0.01)
    raise EngineError("launch", f"no PID-namespace init appeared under {unshare_pid}", log_tail(log_path))


async def _entered(pid: int, ns: netns.NetNs, log_path: Path, timeout_s: float = 10.0) -> None:
    """Wait until `pid` is inside the netns: nsenter may not have called setns yet when exec returns."""
    want = netns.netns_inode(ns.name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == want:
                return
        except OSError:
            pass
        if not procs.pid_alive(pid):
            raise SandboxExited("launch", "the sandbox exited at once", log_tail(log_path))
        await asyncio.sleep(0.005)
    raise EngineError("launch", f"pid {pid} never entered netns {ns.name}", log_tail(log_path))


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _reap_orphan(pid: int) -> None:
    """Reap a dead restored process reparented to us (we are a subreaper, see `become_subreaper`).

    A zombie we launched ourselves is left to asyncio's child watcher, which waits for it.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return
    ours = _launched.get(pid)
    if ours is not None and ours.returncode is None:
        return  # asyncio's child watcher reaps what we launched
    if stat[0] == "Z" and int(stat[1]) == os.getpid():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


# What this process spawned through asyncio, by PID: its child watcher reaps those. A restored tree
# can get a PID back that one of them once had (no PID namespace), hence the returncode check.
_launched: dict[int, asyncio.subprocess.Process] = {}
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make this process the reaper of trees CRIU restores detached (`-d`), so their PIDs are freed
    as soon as they die rather than whenever the host's init gets to it. Idempotent."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: errno %d", ctypes.get_errno())


def is_running(sb: Sandbox) -> bool:
    """The sandbox's init is alive and still in the sandbox's netns (guards against PID reuse)."""
    if not procs.pid_alive(sb.pid):
        return False
    try:
        return os.stat(f"/proc/{sb.pid}/ns/net").st_ino == netns.netns_inode(sb.netns)
    except OSError:
        return False


def tree_pids(sb: Sandbox) -> list[int]:
    """Host PIDs of every live process of the sandbox, its root first."""
    try:
        want = os.stat(f"/proc/{sb.pid}/ns/pid").st_ino
    except OSError:
        return []
    if want == os.stat("/proc/self/ns/pid").st_ino:
        return _descendants(sb.pid)  # a sandbox in the host's PID namespace (GPU)
    out = [sb.pid]
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == sb.pid:
            continue
        try:
            if os.stat(p / "ns" / "pid").st_ino == want and procs.pid_alive(int(p.name)):
                out.append(int(p.name))
        except OSError:
            continue
    return out


def _descendants(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if not procs.pid_alive(pid):
            continue
        out.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
    return out


def log_tail(path: str | Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


async def stop(sb: Sandbox, *, timeout_s: float = 10.0) -> None:
    """Kill the tree and remove its netns. Idempotent: a gone sandbox is fine."""
    victims = tree_pids(sb) if is_running(sb) else []
    # Anything else left in the netns (a stray child of a half-restored tree) goes too.
    victims += [p for p in netns.pids_in_netns(sb.netns) if p not in victims]
    for pid in victims:
        # The init of a PID namespace ignores SIGTERM it does not handle; SIGKILL ends the namespace.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    # Wait until the PIDs are free, not merely dead: a GPU image restores with its old PIDs, and a
    # zombie still holds its PID. Polling /proc: no event says "a process we did not start is gone".
    while any(_exists(p) for p in victims) and time.monotonic() < deadline:
        for p in victims:
            _reap_orphan(p)
        await asyncio.sleep(0.02)
    await netns.delete_netns(sb.netns)
    log.info("stopped %s (pid %d)", sb.replica, sb.pid)
