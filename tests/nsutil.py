"""Network namespaces for tests: make and remove them, run `ip` in them, and enter one on the
calling thread only (setns), so a test's own sockets and subprocesses live there."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def sh(*argv: str) -> str:
    """Run a command; its stdout; raises with its stderr when it fails."""
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p.stdout


def add_netns(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def del_netns(name: str) -> None:
    """Remove `name` (a namespace still used by a process lives on until it exits). Idempotent."""
    if (NETNS_DIR / name).exists():
        with contextlib.suppress(RuntimeError):
            sh("ip", "netns", "del", name)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """This thread in netns `name` for the block (sockets it opens and processes it starts too)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(target)
        os.close(back)
