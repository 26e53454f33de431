"""Real processes for the real-CRIU tests: a silent Python child in its own session, `criu dump`
and `criu restore` with the log's tail on failure, and a status file the child keeps rewriting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from snapscale.shared.engine.criu import CriuBinary


@contextlib.contextmanager
def python_child(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """`python -c script *args` in its own session (no --shell-job needed), output discarded.
    Yields the process and the PIDs to SIGKILL at the end, its own first (append restored ones);
    then reaps it."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pids = [child.pid]
    try:
        yield child, pids
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        if child.poll() is None:
            child.wait(10)


def read_status(path: Path, after: int = 0, timeout_s: float = 20.0) -> tuple[int, int, str]:
    """(pid, counter, state) from a child's status file, once its counter is past `after`."""
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


def criu_dump(criu: CriuBinary, pid: int, images: Path, *extra: str, log: Path | None = None) -> None:
    """`criu dump` of the tree at `pid` into `images` (which ends it); the log tail on failure.
    The log goes to `images/dump.log` unless `log` puts it elsewhere."""
    log = log or images / "dump.log"
    dump = subprocess.run(
        [criu.path, "dump", "-t", str(pid), "-D", str(images), "-o", str(log), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dump.returncode == 0, log.read_text()[-3000:]


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
