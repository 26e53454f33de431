"""Real CRIU on a real process: a Python child's counter and the checksum of 64 MiB of random
memory carry on after dump and restore. Needs root; in CI a skip here is a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from criu_procs import criu_dump, criu_restore, python_child, read_status

from snapscale.shared.engine.criu import CriuBinary

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


@pytest.mark.criu
def test_dump_and_restore_carries_state_on(criu: CriuBinary, tmp_path: Path) -> None:
    status = tmp_path / "status"
    images = tmp_path / "images"
    images.mkdir()
    with python_child(CHILD, str(status)) as (child, pids):
        pid, before, digest = read_status(status)
        assert pid == child.pid
        criu_dump(criu, child.pid, images, "-v4")
        child.wait(10)  # dumped without --leave-running: gone; reap it so its PID is free
        _, at_dump, _ = read_status(status)
        restored_pid = criu_restore(criu, images, tmp_path / "pid", "-v4")
        pids.append(restored_pid)
        pid2, after, digest2 = read_status(status, after=at_dump)
        assert pid2 == restored_pid == child.pid  # CRIU restores the same PID
        assert after > at_dump >= before  # the counter carried on; it did not start again from 1
        assert digest2 == digest  # 64 MiB of random bytes came back intact
