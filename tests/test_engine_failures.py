"""The engine's failure paths on real CRIU and real processes: a failing hook, a missed readiness
deadline, a corrupt image, a crashing workload. Each must fail clearly and leave nothing behind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from engine_helpers import kill_tagged, procs_with, sample_spec

from snapscale.shared.bus.spec import HooksSpec, ReadySpec
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import netns, probe, sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.lifecycle import Sandbox

pytestmark = pytest.mark.criu


@pytest.fixture
def tag() -> str:
    return f"enginefail-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def made(tag: str) -> AsyncIterator[list[Sandbox]]:
    sbs: list[Sandbox] = []
    yield sbs
    for sb in sbs:
        await engine.stop(sb)
    kill_tagged(tag)


@pytest.fixture
async def light_image(criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]) -> Path:
    """A good image of the torch-free sample server (frozen and stopped)."""
    spec = sample_spec("light", tag=tag, preset="none")
    sb = await engine.launch(spec, "src", gpu_uuids=[], run_dir=tmp_path / "run-src")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    img = tmp_path / "img"
    await engine.freeze(sb, spec, img, keep_running=False, criu=criu)
    assert procs_with(tag) == []
    return img


def assert_nothing_left(tag: str, replica: str) -> None:
    assert procs_with(tag) == [], "a process of the failed sandbox is still running"
    assert not Path(netns.NETNS_DIR, f"{netns.PREFIX}{netns.hint(replica)}").exists(), "netns leaked"


async def test_failing_before_freeze_hook_aborts_and_keeps_serving(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    spec = sample_spec(
        "light", tag=tag, preset="none", hooks=HooksSpec(before_freeze="/hooks/fail", timeout_s=5)
    )
    sb = await engine.launch(spec, "hookfail", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    img = tmp_path / "img"
    with pytest.raises(engine.HookError) as ei:
        await engine.freeze(sb, spec, img, keep_running=True, criu=criu)
    assert ei.value.step == "before_freeze"
    assert "answered 500" in ei.value.reason and "always fails" in ei.value.reason
    assert not (img / "pstree.img").exists()  # no dump happened
    assert sandbox.is_running(sb)
    status, _ = await probe.http_request("GET", sb.endpoint, "/generate", timeout_s=5)
    assert status == 200


async def test_failing_after_restore_hook_fails_the_restore(
    criu: CriuBinary, light_image: Path, tmp_path: Path, tag: str
) -> None:
    spec = sample_spec(
        "light", tag=tag, preset="none", hooks=HooksSpec(after_restore="/hooks/fail", timeout_s=5)
    )
    with pytest.raises(engine.HookError, match="after_restore: POST /hooks/fail answered 500"):
        await engine.restore(spec, light_image, "badhook", gpu_uuids=[], run_dir=tmp_path / "r", criu=criu)
    assert_nothing_left(tag, "badhook")


async def test_missed_readiness_deadline(
    criu: CriuBinary, light_image: Path, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    never = ReadySpec(http_path="/not-there", timeout_s=0.5, interval_s=0.05)
    spec = sample_spec("light", tag=tag, preset="none", ready=never, hooks=HooksSpec())
    # On a cold boot the caller decides what to do with a late sandbox...
    sb = await engine.launch(spec, "late", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    with pytest.raises(engine.ReadyTimeout, match=r"not ready after 0.5s: GET /not-there answered 404"):
        await engine.wait_ready(sb, spec.ready)
    await engine.stop(sb)
    # ...a restore that misses its deadline kills what it started.
    with pytest.raises(engine.ReadyTimeout):
        await engine.restore(
            spec, light_image, "laterestore", gpu_uuids=[], run_dir=tmp_path / "r", criu=criu
        )
    assert_nothing_left(tag, "laterestore")


async def test_corrupt_image_fails_clearly_and_leaves_nothing(
    criu: CriuBinary, light_image: Path, tmp_path: Path, tag: str
) -> None:
    spec = sample_spec("light", tag=tag, preset="none")
    pstree = light_image / "pstree.img"
    pstree.write_bytes(pstree.read_bytes()[:8] + b"\xff" * 64)
    with pytest.raises(engine.CriuError) as ei:
        await engine.restore(spec, light_image, "corrupt", gpu_uuids=[], run_dir=tmp_path / "r", criu=criu)
    e = ei.value
    assert e.step == "criu_restore" and "criu restore exited" in e.reason
    assert "Error" in e.log_tail, e.log_tail  # CRIU's own error lines, not just an exit code
    assert_nothing_left(tag, "corrupt")


async def test_missing_image_is_a_clear_error(criu: CriuBinary, tmp_path: Path, tag: str) -> None:
    spec = sample_spec("light", tag=tag, preset="none")
    with pytest.raises(engine.EngineError, match="holds no snapscale image"):
        await engine.restore(
            spec, tmp_path / "nothing", "noimg", gpu_uuids=[], run_dir=tmp_path / "r", criu=criu
        )
    assert_nothing_left(tag, "noimg")


async def test_image_of_another_deployment_is_refused(
    criu: CriuBinary, light_image: Path, tmp_path: Path, tag: str
) -> None:
    spec = replace(sample_spec("light", tag=tag, preset="none"), name="other")
    with pytest.raises(engine.EngineError, match="image is of deployment 'light', not 'other'"):
        await engine.restore(spec, light_image, "wrongdep", gpu_uuids=[], run_dir=tmp_path / "r", criu=criu)


async def test_workload_crashing_at_boot_fails_fast(tmp_path: Path, tag: str, made: list[Sandbox]) -> None:
    spec = sample_spec("crash", tag=tag, command=["/bin/sh", "-c", f"echo boom {tag}; sleep 0.5; exit 3"])
    sb = await engine.launch(spec, "crash", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    with pytest.raises(engine.SandboxExited, match="exited before it was ready") as ei:
        await engine.wait_ready(sb, spec.ready)
    assert "boom" in ei.value.log_tail


async def test_a_spec_path_without_system_dirs_still_launches(
    tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    # The sandbox prelude finds its own tools; the workload gets the PATH its spec asks for.
    spec = sample_spec("light", tag=tag, preset="none")
    spec = replace(spec, env={"PATH": str(tmp_path)})
    sb = await engine.launch(spec, "oddpath", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)


async def test_tcp_and_file_readiness_probes(tmp_path: Path, tag: str, made: list[Sandbox]) -> None:
    tcp = ReadySpec(http_path=None, tcp=True, timeout_s=30, interval_s=0.05)
    spec = sample_spec("light", tag=tag, preset="none", ready=tcp, hooks=HooksSpec())
    sb = await engine.launch(spec, "tcpready", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    assert await engine.wait_ready(sb, spec.ready) < 30

    flag = tmp_path / "ready-flag"
    file_ready = ReadySpec(http_path=None, file="ready-flag", timeout_s=0.3, interval_s=0.05)
    with pytest.raises(engine.ReadyTimeout, match="ready-flag does not exist"):
        await engine.wait_ready(sb, file_ready, cwd=str(tmp_path))
    flag.touch()  # a relative path is taken from the spec's cwd
    await engine.wait_ready(sb, file_ready, cwd=str(tmp_path))


async def test_a_hook_past_its_deadline_aborts_the_freeze(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    hooks = HooksSpec(before_freeze="/hooks/hang", timeout_s=0.5)
    spec = sample_spec("light", tag=tag, preset="none", hooks=hooks)
    sb = await engine.launch(spec, "hookhang", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    with pytest.raises(engine.HookError, match=r"POST /hooks/hang missed its 0\.5s deadline"):
        await engine.freeze(sb, spec, tmp_path / "img", keep_running=True, criu=criu)
    assert not (tmp_path / "img" / "pstree.img").exists()
