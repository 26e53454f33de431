"""PID 1 of a new sandbox, for a moment: prepare the namespaces, then exec the workload in its place.

Run by the launcher as `python -I -S sandbox_init.py <log> <command...>` inside fresh PID + mount
namespaces. Standard library only, no snapscale imports (-S: no site-packages). Never imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

MNT_DETACH = 2


def main(argv: list[str]) -> None:
    log, cmd = argv[0], argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    # CRIU cannot dump nsfs mounts (other replicas' /run/netns entries); propagation is private,
    # so detaching them here leaves the host's alone.
    with open("/proc/self/mounts") as f:
        nsfs = [ln.split()[1] for ln in f if ln.split()[2] == "nsfs"]
    for m in reversed(nsfs):
        libc.umount2(m.encode("latin-1").decode("unicode_escape").encode(), MNT_DETACH)
    # Inherited fds (uvloop leaves a /dev/null open without CLOEXEC) and stdio opened in the host's
    # mount namespace cannot be dumped from this one: close them, reopen stdio from in here.
    os.closerange(3, 1 << 20)
    fd = os.open("/dev/null", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.setsid()  # its own session: CRIU then needs no --shell-job
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"snapscale sandbox: cannot start {cmd[0]}: {e}", flush=True)
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
