"""Network namespaces for tests: make and remove them, run `ip` in them, and run a test's async
body in one (`run_in`: a thread of its own enters it, so its sockets and subprocesses live there)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

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


def run_in(name: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`main()` on an event loop of its own, in a thread of its own that entered netns `name`.

    Every socket, thread and process it makes is in that namespace too, and its worker threads end
    with it: the session's event loop and its executor threads never change namespace (a worker
    left in a removed namespace would break a later test's `to_thread` network call).
    """
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            out.append(asyncio.run(main()))
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, name=f"in-{name}")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]
