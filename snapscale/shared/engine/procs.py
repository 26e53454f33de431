"""Finding processes through /proc: who holds files under a directory, who is still alive.

Used to clean up sandboxes whose records were lost; nothing here sends signals.
"""

from __future__ import annotations

import os
from pathlib import Path


def pids_holding(root: Path, proc: Path = Path("/proc")) -> list[int]:
    """PIDs (not ours) with their cwd or an open file under `root`."""
    if not root.exists():
        return []
    prefix = str(root.resolve())
    me = os.getpid()
    out: list[int] = []
    for p in proc.iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            targets = [os.readlink(p / "cwd")] + [os.readlink(fd) for fd in (p / "fd").iterdir()]
        except OSError:
            continue
        if any(t == prefix or t.startswith(prefix + "/") for t in targets):
            out.append(int(p.name))
    return out


def pid_alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
