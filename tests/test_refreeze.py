"""A restored replica can be frozen again, on both sandbox seams: freeze (keep running) -> restore
-> freeze that restored replica -> restore, its memory counting on at each step.

A restored host-process sandbox writes its stdout and stderr into the log file the restore handed
it (`--inherit-fd`), opened in the host's mount namespace, which its own does not hold; the next
dump marks that file external (`--external file[mnt_id:inode]`) and the restore after it hands the
new replica's log in under that key. An OCI sandbox's stdio are pipes that runc hands over at each
restore (docs/sandbox.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from engine_fixtures import made
from oci_image import DUMP_USER, PROBE, oci_ref, probe_spec

from snapscale.shared.bus.spec import DeploymentSpec, ReadySpec
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.lifecycle import Sandbox

pytestmark = [pytest.mark.criu, pytest.mark.skipif(os.geteuid() != 0, reason="CRIU needs root")]
__all__ = ["made", "oci_ref"]  # fixtures


async def _count(sb: Sandbox) -> object:
    status, out = await probe.http_request("GET", sb.endpoint, "/count", timeout_s=10)
    assert status == 200, out
    return json.loads(out)


def _spec(seam: str, tmp: Path, request: pytest.FixtureRequest, mp: pytest.MonkeyPatch) -> DeploymentSpec:
    if seam == "host":
        app = tmp / "probe.py"
        app.write_text(PROBE)
        return DeploymentSpec(
            name="again",
            command=[sys.executable, "-I", str(app)],
            cwd=str(tmp),
            ready=ReadySpec(http_path="/healthz", timeout_s=30.0, interval_s=0.02),
        )
    if not shutil.which("runc") or not shutil.which("umoci"):
        pytest.skip("runc/umoci not installed")
    mp.delenv("SNAPSCALE_SANDBOX")  # not development mode: an image is what runs
    mp.setenv("SNAPSCALE_SANDBOX_MOUNTS", "/usr")  # the probe's interpreter
    mp.setenv("SNAPSCALE_STATE_DIR", str(tmp / "state"))
    return probe_spec("again", request.getfixturevalue("oci_ref"), user=DUMP_USER)


@pytest.mark.parametrize("seam", ["host", "oci"])
async def test_a_restored_replica_is_frozen_again_and_restored_with_its_memory(
    seam: str,
    made: list[Sandbox],
    tmp_path: Path,
    criu: CriuBinary,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = _spec(seam, tmp_path, request, monkeypatch)
    sb = await engine.launch(spec, "again-1", gpu_uuids=[], run_dir=tmp_path / "run" / "again-1")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready, cwd=spec.cwd)
    assert await _count(sb) == 1
    await engine.freeze(sb, spec, tmp_path / "img-1", keep_running=True, criu=criu)
    assert await _count(sb) == 2  # the original serves on; the image holds 1
    await engine.stop(sb)
    for n, (image, replica) in enumerate((("img-1", "again-2"), ("img-2", "again-3"))):
        back, _ = await engine.restore(
            spec, tmp_path / image, replica, gpu_uuids=[], run_dir=tmp_path / "run" / replica, criu=criu
        )
        made.append(back)
        assert await _count(back) == 2 + n, (seam, replica)
        if seam == "host":  # its stdout is its own replica's log, handed in by the restore
            assert os.readlink(f"/proc/{back.pid}/fd/1") == str(tmp_path / "run" / replica / "sandbox.log")
        if n == 0:  # the restored replica, frozen in its turn (and gone with it)
            await engine.freeze(back, spec, tmp_path / "img-2", keep_running=False, criu=criu)
