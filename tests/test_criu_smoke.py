"""Real CRIU on a real process: a Python child's counter and the checksum of 64 MiB of random
memory carry on after dump and restore. Needs root; in CI a skip here is a failure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapscale.shared.criu import CriuBinary

CHILD = r"""
import hashlib, os, sys, time
status = sys.argv[1]
data = bytearray(os.urandom(64 << 20))  # nobody can recompute this: it must survive in memory
counter = 0
while True:
    counter += 1
    digest = hashlib.sha256(data).hexdigest()
    tmp = status + ".tmp"
    with open(tmp, "w") as f:  # never hold a file open across a dump
        f.write(f"{os.getpid()} {counter} {digest}")
    os.replace(tmp, status)
    time.sleep(0.05)
"""


def read_status(path: Path, after: int = 0, timeout_s: float = 20.0) -> tuple[int, int, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, counter, digest = path.read_text().split()
            if int(counter) > after:
                return int(pid), int(counter), digest
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not advance past {after}")


def criu_dump(criu: CriuBinary, pid: int, images: Path, *extra: str) -> None:
    """`criu dump` of the tree at `pid` into `images` (which ends it); the log tail on failure."""
    dump = subprocess.run(
        [criu.path, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dump.returncode == 0, (images / "dump.log").read_text()[-3000:]


def criu_restore(criu: CriuBinary, images: Path, pidfile: Path, *extra: str) -> int:
    """`criu restore -d` from `images`; the restored root's PID (the log tail on failure)."""
    restore = subprocess.run(
        [criu.path, "restore", "-d", "-D", str(images), "-o", "restore.log", *extra,
         "--pidfile", str(pidfile)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert restore.returncode == 0, (images / "restore.log").read_text()[-3000:]
    return int(pidfile.read_text())


@pytest.mark.criu
def test_dump_and_restore_carries_state_on(criu: CriuBinary, tmp_path: Path) -> None:
    status = tmp_path / "status"
    images = tmp_path / "images"
    images.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(status)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own session: no --shell-job needed
    )
    restored_pid = None
    try:
        pid, before, digest = read_status(status)
        assert pid == child.pid
        criu_dump(criu, child.pid, images, "-v4")
        child.wait(10)  # dumped without --leave-running: gone; reap it so its PID is free
        _, at_dump, _ = read_status(status)
        restored_pid = criu_restore(criu, images, tmp_path / "pid", "-v4")
        pid2, after, digest2 = read_status(status, after=at_dump)
        assert pid2 == restored_pid == child.pid  # CRIU restores the same PID
        assert after > at_dump >= before  # the counter carried on; it did not start again from 1
        assert digest2 == digest  # 64 MiB of random bytes came back intact
    finally:
        for p in (restored_pid, child.pid):
            if p is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        if child.poll() is None:
            child.wait(10)
