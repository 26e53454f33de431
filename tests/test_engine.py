"""The CPU path end to end on real CRIU: launch the sample sandbox, freeze it twice, restore it twice
at once from one image, and compare every answer with the original."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest
from engine_fixtures import answer, made, tag
from engine_helpers import ROOT, netns_exists, procs_with, read_text, sample_spec

from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.lifecycle import Sandbox
from snapscale.shared.engine.registry import SandboxRegistry

pytestmark = pytest.mark.criu
__all__ = ["made", "tag"]  # fixtures


async def test_launch_freeze_restore_twice_concurrently(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    spec = sample_spec("sample", tag=tag, weights=tmp_path / "tiny.pt")
    sb = await engine.launch(spec, "orig", gpu_uuids=[], run_dir=tmp_path / "run-orig")
    made.append(sb)
    assert sandbox.is_running(sb)
    assert sb.endpoint.startswith("10.213.") and sb.endpoint.endswith(":8000")
    await engine.wait_ready(sb, spec.ready)
    original = await answer(sb)
    assert b'"tokens"' in original and b'"kv_sum": "0x' in original

    # Freeze, keep serving: the before_freeze hook drops the KV cache, after_restore brings it back.
    img1 = tmp_path / "img-keep"
    rep = await engine.freeze(sb, spec, img1, keep_running=True, criu=criu)
    assert sandbox.is_running(sb)
    assert await answer(sb) == original
    assert {"before_freeze", "criu_dump", "after_restore", "freeze"} <= rep.timings_s.keys()
    assert rep.image_bytes > 10 << 20 and rep.criu_stats["pages_written"] > 1000
    assert not rep.cuda

    # Freeze again and stop: the tree and its netns are gone afterwards.
    img2 = tmp_path / "img-stop"
    rep2 = await engine.freeze(sb, spec, img2, keep_running=False, criu=criu)
    assert not rep2.keep_running
    # The image went through criu_pages (the CPU sample has next to no zero pages to drop; the
    # GPU sample's are measured by bench/e2e_gpu.py) and the restores below answer the same.
    assert "drop_zero_pages" in rep2.timings_s
    assert rep2.image_bytes == sum(p.stat().st_size for p in img2.rglob("*") if p.is_file())
    assert not sandbox.is_running(sb)
    assert not netns_exists(sb.netns)

    # Two replicas from the one image at once, on one host: both come up and answer the same.
    (a, ra), (b, rb) = await asyncio.gather(
        *(
            engine.restore(
                spec,
                img2,
                f"copy{i}",
                gpu_uuids=[],
                run_dir=tmp_path / f"run-{i}",
                criu=criu,
                checkpoint_id="ck1",
            )
            for i in (1, 2)
        )
    )
    made += [a, b]
    assert a.endpoint != b.endpoint and a.netns != b.netns and a.pid != b.pid
    assert a.checkpoint_id == "ck1"
    assert await answer(a) == original
    assert await answer(b) == original
    for r in (ra, rb):
        steps = {"sandbox_prepare", "criu_restore", "after_restore", "ready_probe", "restore"}
        assert steps <= r.timings_s.keys()
        assert r.criu_stats.get("pages_restored", 0) > 1000
    # each restore's CRIU stats in its own run dir: read from the shared image, one could be read
    # while the other was writing it (an empty stats dict, once in a full run)
    assert not (img2 / "stats-restore").exists()
    assert all((tmp_path / f"run-{i}" / "stats-restore").is_file() for i in (1, 2))
    # Each replica writes to its own log (the frozen log fd was swapped for a fresh one).
    for s in (a, b):
        assert "after_restore: KV cache allocated" in read_text(s.log_path)
    assert len(procs_with(tag)) == 2

    # The registry records them across a restart of the agent.
    reg = SandboxRegistry(tmp_path / "state")
    reg.put(a)
    reg.put(b)
    assert SandboxRegistry(tmp_path / "state").all() == [a, b]

    await engine.stop(a)
    await engine.stop(a)  # idempotent
    assert not sandbox.is_running(a) and not netns_exists(a.netns)
    assert sandbox.is_running(b) and await answer(b) == original


async def test_cpu_sandbox_cannot_suspend(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    spec = sample_spec("light", tag=tag, preset="none")
    sb = await engine.launch(spec, "cpu1", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    with pytest.raises(engine.CudaError, match="CPU sandbox"):
        await engine.suspend(sb)


def test_root_only_paths_exist() -> None:
    # The launcher relies on these tools; say so plainly when a machine lacks them.
    for tool in ("ip", "nsenter", "unshare", "setsid"):
        assert any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":")), tool


async def test_sandbox_has_its_own_proc_across_restores(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    """CUDA needs a /proc that matches the PID namespace; a GPU spec's sandbox (here without a GPU)
    gets one, keeps it through freeze and restore, and two restores of its image coexist."""
    spec = replace(sample_spec("gpuish", tag=tag, preset="none"), gpus=1)
    sb = await engine.launch(spec, "ownproc", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    assert own_proc_shows_init(sb.pid, tag)
    original = await answer(sb)
    await engine.freeze(sb, spec, tmp_path / "img", keep_running=True, criu=criu)
    (a, _), (b, _) = await asyncio.gather(
        *(
            engine.restore(
                spec, tmp_path / "img", f"ownproc{i}", gpu_uuids=[], run_dir=tmp_path / f"r{i}", criu=criu
            )
            for i in (1, 2)
        )
    )
    made += [a, b]
    for s in (sb, a, b):
        assert own_proc_shows_init(s.pid, tag)
        assert await answer(s) == original


def own_proc_shows_init(pid: int, tag: str) -> bool:
    """In the sandbox's own mount namespace, /proc/1 is the sandbox's init (its PID namespace's)."""
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino and tag.encode() in (
        Path(f"/proc/{pid}/root/proc/1/cmdline").read_bytes()
    )


async def test_every_step_is_a_span(criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first test of the session to need one
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    spec = sample_spec("light", tag=tag, preset="none")
    sb = await engine.launch(spec, "spans", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    rep = await engine.freeze(sb, spec, tmp_path / "img", keep_running=False, criu=criu)
    back, rr = await engine.restore(
        spec, tmp_path / "img", "spans2", gpu_uuids=[], run_dir=tmp_path / "r", criu=criu
    )
    made.append(back)
    mine = [s for s in exporter.get_finished_spans() if s.name.startswith("engine.")]
    names = {s.name for s in mine}
    assert {f"engine.{k}" for k in rep.timings_s} | {f"engine.{k}" for k in rr.timings_s} <= names
    dump = next(s for s in mine if s.name == "engine.criu_dump")
    assert dump.attributes is not None and dump.attributes["snapscale.replica"] == "spans"
    # The step spans nest under the freeze span.
    freeze = next(s for s in mine if s.name == "engine.freeze")
    assert dump.parent is not None and freeze.context is not None
    assert dump.parent.span_id == freeze.context.span_id


UVLOOP_FREEZE = """
import asyncio, os, sys
from pathlib import Path
import uvloop
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import find_criu
sys.path.insert(0, "tests")
from engine_helpers import sample_spec

async def main() -> None:
    stray = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(stray, True)  # what a library may leave behind in the agent
    tmp, tag = Path(sys.argv[1]), sys.argv[2]
    spec = sample_spec("light", tag=tag, preset="none")
    sb = await engine.launch(spec, "uv", gpu_uuids=[], run_dir=tmp / "run")
    try:
        await engine.wait_ready(sb, spec.ready)
        await engine.freeze(sb, spec, tmp / "img", keep_running=False, criu=find_criu())
        print("FROZEN")
    finally:
        await engine.stop(sb)

uvloop.run(main())
"""


def test_freeze_from_a_uvloop_agent_with_stray_fds(criu: CriuBinary, tmp_path: Path, tag: str) -> None:
    """The services run on uvloop, whose subprocesses inherit fds the agent left open; the sandbox
    must not carry them (CRIU cannot dump a file opened through the host's mount namespace)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", UVLOOP_FREEZE, str(tmp_path), tag],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "FROZEN" in out.stdout, out.stdout + out.stderr
