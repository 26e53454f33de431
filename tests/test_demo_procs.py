"""The demo's process handling on real processes: whole groups stop, a TERM-ignorer is killed,
and a sandbox left running under the work dir goes with its network namespace."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from snapscale.demo.procs import ProcessSet, reap_sandboxes
from snapscale.shared.engine.procs import pids_holding


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(x) for x in out.split()]


def test_stop_all_ends_whole_groups_even_a_term_ignorer(tmp_path: Path) -> None:
    ps = ProcessSet(tmp_path / "logs")
    tree = ps.start("tree", ["sh", "-c", "sleep 300 & sleep 300 & wait"], dict(os.environ))
    stubborn = ps.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & wait"], dict(os.environ))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(children_of(tree.proc.pid)) < 3:
        time.sleep(0.05)
    pids = children_of(tree.proc.pid) + children_of(stubborn.proc.pid)
    assert len(pids) >= 4
    assert ps.dead() == []
    t0 = time.monotonic()
    ps.stop_all(timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert not [p for p in pids if alive(p)]
    assert {m.name for m in ps.dead()} == {"tree", "stubborn"}
    assert (tmp_path / "logs" / "tree.log").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_reap_kills_sandboxes_under_the_work_dir_and_deletes_their_netns(tmp_path: Path) -> None:
    name = f"snapscale-demo-test-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    work = tmp_path / "work"
    (work / "run").mkdir(parents=True)
    outside = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        with open(work / "run" / "sandbox.log", "wb") as logf:
            sb = subprocess.Popen(
                ["ip", "netns", "exec", name, "sleep", "300"],
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sb.pid not in pids_holding(work):
            time.sleep(0.05)
        assert sb.pid in pids_holding(work)
        killed, nets = reap_sandboxes(work)
        sb.wait(5)
        assert sb.pid in killed
        assert nets == [name]
        assert not Path("/run/netns", name).exists()
        assert alive(outside.pid), "a process that holds nothing under the work dir is left alone"
    finally:
        outside.kill()
        outside.wait()
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
