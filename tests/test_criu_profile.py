"""Where a CRIU restore spends its time, read from its `-v4` log: phases split at CRIU's own markers,
page reads as the union of every task's preadv; checked on a hand-made log and on a real restore."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from criu_procs import criu_dump, criu_restore, python_child

from snapscale.shared.engine import criu
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.criu_profile import profile_file, profile_restore

# Two tasks whose page reads overlap (1.0-3.0 and 2.0-3.5): 2.5 s of wall clock, not 3.5.
LOG = """\
(00.000000) CRIU run id = x
(00.500000) Forking task with 1 pid (flags 0x0)
(00.700000) pie: 1: Switched to the restorer 1
(01.000000) pie: 1: Preadv 0x1000:4096... (3 iovs)
(02.000000) pie: 2: Preadv 0x9000:4096... (1 iovs)
(03.000000) pie: 1: `- returned 3000000000
(03.500000) pie: 2: `- returned 1000000000
(03.600000) pie: 1: Restored
(04.000000) Restore finished successfully. Tasks resumed.
(04.250000) Running post-resume scripts
not a log line
"""


def test_phases_from_a_hand_made_log() -> None:
    p = profile_restore(LOG)
    assert p.logged_s == 4.25
    assert p.phases_s == {
        "before_fork": 0.5,
        "fork_and_prepare": 0.2,
        "page_reads": 2.5,
        "restorer_other": 0.8,
        "after_resume": 0.25,
    }
    assert sum(p.phases_s.values()) == pytest.approx(p.logged_s)
    assert (p.page_bytes, p.page_reads) == (4_000_000_000, 2)
    assert p.page_gbps == pytest.approx(1.6)
    assert p.slowest[0] == (1.0, "pie: 2: Preadv 0x9000:4096... (1 iovs)")


def test_a_log_without_markers_or_lines() -> None:
    assert profile_restore("").phases_s == {}
    p = profile_restore("(00.000000) start\n(00.300000) Error: Restoring FAILED.\n")
    assert p.phases_s["before_fork"] == pytest.approx(0.3) and p.page_bytes == 0


def test_restore_argv_log_level() -> None:
    b = CriuBinary("/opt/criu", "4.2.1")
    kw = {"inherit": {}, "log_path": Path("/l"), "pidfile": Path("/p")}
    assert "-v2" in criu.restore_argv(b, Path("/img"), **kw)  # type: ignore[arg-type]
    assert "-v4" in criu.restore_argv(b, Path("/img"), **kw, log_level=4)  # type: ignore[arg-type]


CHILD = """
import os, sys, time
data = bytearray(os.urandom(64 << 20))
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(1)
"""


@pytest.mark.criu
def test_a_real_restore_log(criu: CriuBinary, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    images = tmp_path / "img"
    images.mkdir()
    with python_child(CHILD, str(ready)) as (child, pids):
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline, "child never got ready"
            time.sleep(0.02)
        criu_dump(criu, child.pid, images)
        child.wait(10)  # reaped, so its PID is free for the restore
        pids.append(criu_restore(criu, images, tmp_path / "pid", "-v4"))
    p = profile_file(images / "restore.log")
    pages = sum(f.stat().st_size for f in images.glob("pages-*.img"))
    assert p.page_bytes == pages >= 64 << 20  # every page CRIU restored went through a timed preadv
    assert p.page_reads >= 1 and p.phases_s["page_reads"] > 0
    assert sum(p.phases_s.values()) == pytest.approx(p.logged_s, abs=1e-5)
    assert os.path.getsize(images / "restore.log") > 10_000  # -v4: every step logged
