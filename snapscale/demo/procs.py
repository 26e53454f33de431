"""The processes `snapscale demo` starts, each in its own process group, and their cleanup.

Everything started here is stopped here: services by group (TERM, then KILL), sandboxes the
restorer left by the files they hold under the demo's work dir, and their network namespaces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import pid_alive, pids_holding

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    """Block until something listens on 127.0.0.1:`port`; `TimeoutError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not port_open(port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")
        time.sleep(0.05)


def find_exe(name: str) -> str:
    """An executable next to this interpreter (the venv's bin) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found next to {sys.executable} or on PATH: run `make setup`")
    return found


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class ProcessSet:
    """Child processes, each the leader of its own process group so its whole tree can be stopped."""

    log_dir: Path
    procs: list[Managed] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Managed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: Ctrl-C reaches only us, we stop it
            )
        m = Managed(name, proc, log_path)
        self.procs.append(m)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return m

    def dead(self) -> list[Managed]:
        return [m for m in self.procs if m.proc.poll() is not None]

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every group (newest first, so services go before the nats-server), then SIGKILL."""
        for m in reversed(self.procs):
            self._signal(m, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while m.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            members = _group(m.proc.pid)
            self._signal(m, signal.SIGKILL)  # leftovers of the group, or a process that ignored TERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(5)
            # SIGKILL is delivered asynchronously: "stopped" means every member is gone, not just
            # the leader we wait on
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(pid_alive(p) for p in members):
                time.sleep(0.02)

    @staticmethod
    def _signal(m: Managed, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(m.proc.pid, sig)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _group(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (read from /proc: field 5 of stat)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(p.name))
    return out


# --- sandboxes left behind ---------------------------------------------------------------
def _net_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_by_inode() -> dict[int, str]:
    out: dict[int, str] = {}
    if NETNS_DIR.exists():
        for p in NETNS_DIR.iterdir():
            with contextlib.suppress(OSError):
                out[p.stat().st_ino] = p.name
    return out


def pids_in_netns(inodes: set[int]) -> set[int]:
    out: set[int] = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and _net_inode(int(p.name)) in inodes:
            out.add(int(p.name))
    return out


def reap_sandboxes(work_dir: Path, *, timeout_s: float = 10.0) -> tuple[list[int], list[str]]:
    """Kill what still runs from `work_dir` (sandboxes the restorer did not stop) and delete the
    network namespaces they lived in. Returns the PIDs killed and the namespaces deleted."""
    pids = set(pids_holding(work_dir))
    host_net = _net_inode(os.getpid())
    inodes = {i for i in (_net_inode(p) for p in pids) if i is not None and i != host_net}
    names = netns_by_inode()
    ours = [names[i] for i in inodes if i in names]
    pids |= pids_in_netns(inodes)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a PID-namespace init ignores SIGTERM it does not handle
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for name in ours:
        # Deleting the netns destroys its end of the veth pair, and with it the host's end.
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
    return sorted(pids), sorted(ours)
