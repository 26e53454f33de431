"""The gpu-host container's healthcheck (`compose/gpu-host.sh check`), run on this machine against
the real restorer and freezer that gpu-host.sh starts: it fails before they run, passes while both
do, and fails once one is down (the old `pgrep -f` inside `sh -c` matched its own shell and passed
with both down)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_helpers import ROOT
from restorer_harness import service_env

from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = pytest.mark.criu
SCRIPT = ROOT / "compose" / "gpu-host.sh"


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The healthcheck command exactly as compose runs it."""
    cmd = [str(SCRIPT), "check"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10, check=False)


def until(ok: object, timeout_s: float) -> bool:
    assert callable(ok)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return True
        time.sleep(0.1)
    return False


def test_healthcheck_follows_the_services(settings: Settings, criu: CriuBinary, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**service_env(settings, criu), "SNAPSCALE_RUN_DIR": str(run)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `snapscale` as in the image
    assert check(env).returncode == 1, "nothing runs yet"

    log = open(tmp_path / "gpu-host.log", "wb")  # noqa: SIM115 - the script outlives this line
    host = subprocess.Popen([str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert until(lambda: check(env).returncode == 0, 30), (tmp_path / "gpu-host.log").read_text()[-2000:]
        freezer = int((run / "freezer.pid").read_text())
        os.kill(freezer, signal.SIGKILL)
        r = check(env)
        assert r.returncode == 1 and "is down" in r.stderr, r  # the freezer, or the restorer stopped after it
        # gpu-host.sh stops the restorer too and exits with the freezer's status: compose restarts it
        assert host.wait(30) == 128 + signal.SIGKILL
        assert check(env).returncode == 1
    finally:
        if host.poll() is None:
            host.terminate()
            host.wait(30)
        log.close()
