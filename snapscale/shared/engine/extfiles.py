"""Files a host-process sandbox holds through a mount outside its own mount namespace: the stdio log
a restore handed it.

A cold-booted sandbox reopens its stdio log inside its own mount namespace (sandbox_init.py), so
CRIU dumps it as a path. A restored one writes into the log its restore passed in with
`--inherit-fd`, opened in the host's mount namespace; the restored namespace (rebuilt by CRIU, with
mount ids of its own) does not hold that mount, and the next dump failed (`Can't lookup mount=<id>
for fd=1`). Such a file is dumped as external instead (`--external file[<mnt_id>:<inode>]`, both
hex, CRIU's files-reg.c), and the restore after it hands the new replica's log in under that key.
An OCI sandbox's stdio are pipes (oci/container.py): nothing of this applies there.
"""

from __future__ import annotations

import os
from pathlib import Path


def file_key(mnt_id: int, inode: int) -> str:
    """CRIU's name for an external file, for `--external` and `--inherit-fd`. Pure."""
    return f"file[{mnt_id:x}:{inode:x}]"


def mount_ids(mountinfo: str) -> set[int]:
    """The mount ids in a /proc/<pid>/mountinfo text. Pure."""
    return {int(line.split()[0]) for line in mountinfo.splitlines() if line.strip()}


def fd_mount_id(fdinfo: str) -> int | None:
    """The `mnt_id:` of a /proc/<pid>/fdinfo/<fd> text. Pure."""
    for line in fdinfo.splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return None


def outside_keys(pids: list[int], path: str, proc: Path = Path("/proc")) -> list[str]:
    """CRIU's keys for the descriptors of `pids` open on the file at `path` through a mount that the
    mount namespace of `pids[0]` (the sandbox's root) does not hold, each once."""
    if not pids:
        return []
    try:
        want = os.stat(path)
        inside = mount_ids((proc / str(pids[0]) / "mountinfo").read_text())
    except OSError:
        return []
    keys: list[str] = []
    for pid in pids:
        try:
            fds = list((proc / str(pid) / "fd").iterdir())
        except OSError:
            continue  # gone: the dump says so if it matters
        for fd in fds:
            try:
                st = os.stat(fd)
                if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
                    continue
                mnt = fd_mount_id((proc / str(pid) / "fdinfo" / fd.name).read_text())
            except OSError:
                continue
            if mnt is not None and mnt not in inside and file_key(mnt, st.st_ino) not in keys:
                keys.append(file_key(mnt, st.st_ino))
    return keys
