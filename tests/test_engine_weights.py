"""Weights outside the image, through the engine on real CRIU: the CPU sample with
`--weights-outside` (a host arena standing in for GPU memory) freezes without its weights' bytes in
the image, keeps serving, and restores with its weights filled from chunk files or its own files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from engine_fixtures import answer, made, tag
from engine_helpers import procs_with, sample_spec
from safetensors.torch import save_file
from workload_helpers import chunk_dir

from examples.sample_server.model import PRESETS, random_state_dict
from snapscale.shared.bus.spec import HooksSpec
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.lifecycle import Sandbox
from snapscale.workload import ChunkDir, WeightsRecord
from snapscale.workload.record import IMAGE_FILE
from snapscale.workload.stfile import read_layout

pytestmark = pytest.mark.criu
__all__ = ["made", "tag"]  # fixtures


def weights_file(path: Path) -> bytes:
    """The tiny preset's weights, written here (not by the sandbox, whose heap would keep a copy);
    returns 4 KiB from the middle of the embedding, to look for in images."""
    save_file(random_state_dict(PRESETS["tiny"], 0, torch.float32), str(path))
    embed = next(t for t in read_layout(str(path)) if t.name == "embed.weight")
    with open(path, "rb") as f:
        f.seek(embed.start + embed.nbytes // 2)
        return f.read(4096)


def pages_hold(image: Path, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in image.glob("pages-*.img"))


async def test_weights_stay_out_of_the_image_and_come_back(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    needle = weights_file(tmp_path / "tiny.safetensors")
    base = sample_spec("wsample", tag=tag, weights=tmp_path / "tiny.safetensors")
    spec = replace(base, command=[*base.command, "--weights-outside"])
    sb = await engine.launch(spec, "orig", gpu_uuids=[], run_dir=tmp_path / "run-orig")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    original = await answer(sb)

    # No after_restore hook, no offer: the workload keeps its weights and they go into the image.
    inside = tmp_path / "img-inside"
    no_offer = replace(spec, hooks=HooksSpec(before_freeze="/hooks/before_freeze", timeout_s=10))
    told: list[WeightsRecord] = []  # on_weights: the freezer starts their upload from it
    rep0 = await engine.freeze(sb, no_offer, inside, keep_running=True, criu=criu, on_weights=told.append)
    assert rep0.weights_bytes == 0 and not (inside / IMAGE_FILE).exists() and told == []
    assert pages_hold(inside, needle)
    await probe.run_hook("after_restore", sb.endpoint, "/hooks/after_restore", timeout_s=10, log_tail=str)
    assert await answer(sb) == original

    # Offered: released before the dump, their record in the image dir, refilled to keep serving.
    out = tmp_path / "img-outside"
    rep = await engine.freeze(sb, spec, out, keep_running=True, criu=criu, on_weights=told.append)
    record = engine.read_weights(out)
    assert record is not None and record.arena.kind == "host" and told == [record]
    assert rep.weights_bytes == record.nbytes > 600_000
    assert not pages_hold(out, needle)
    assert await answer(sb) == original  # filled back from its file, verified
    await engine.stop(sb)

    # Restored with the weights from chunk files (what a restorer hands over from its host cache).
    cache = chunk_dir(record, tmp_path / "cache")
    r1, rr = await engine.restore(spec, out, "w1", gpu_uuids=[], run_dir=tmp_path / "run-1", criu=criu,
                                  weights=ChunkDir(str(cache)))  # fmt: skip
    made.append(r1)
    assert await answer(r1) == original
    assert "after_restore" in rr.timings_s
    # No source named: the record's own files, verified.
    r2, _ = await engine.restore(spec, out, "w2", gpu_uuids=[], run_dir=tmp_path / "run-2", criu=criu)
    made.append(r2)
    assert await answer(r2) == original

    # Chunks that are not there: the fill fails, the restore with it, and nothing stays running.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(engine.HookError, match="after_restore: POST /hooks/after_restore answered 500"):
        await engine.restore(spec, out, "w3", gpu_uuids=[], run_dir=tmp_path / "run-3", criu=criu,
                             weights=ChunkDir(str(empty)))  # fmt: skip
    assert len(procs_with(tag)) == 2  # r1 and r2 only


async def test_an_image_with_weights_outside_is_refused_without_a_way_to_fill_them(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox]
) -> None:
    weights_file(tmp_path / "tiny.safetensors")
    base = sample_spec("wsample", tag=tag, weights=tmp_path / "tiny.safetensors")
    spec = replace(base, command=[*base.command, "--weights-outside"])
    sb = await engine.launch(spec, "orig", gpu_uuids=[], run_dir=tmp_path / "run-orig")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    img = tmp_path / "img"
    await engine.freeze(sb, spec, img, keep_running=False, criu=criu)
    good = (img / IMAGE_FILE).read_bytes()
    # Both refusals come before anything starts: no process, no netns left behind.
    no_hook = replace(spec, hooks=HooksSpec(before_freeze="/hooks/before_freeze"))
    with pytest.raises(engine.EngineError, match="outside it and the spec has no after_restore hook"):
        await engine.restore(no_hook, img, "x", gpu_uuids=[], run_dir=tmp_path / "run-x", criu=criu)
    (img / IMAGE_FILE).write_bytes(good.replace(b'"chunk_bytes":', b'"chunk_bytez":'))
    with pytest.raises(
        engine.EngineError, match=r"snapscale-weights\.json in the image is unusable: .*chunk_bytes: missing"
    ):
        await engine.restore(spec, img, "y", gpu_uuids=[], run_dir=tmp_path / "run-y", criu=criu)
    assert procs_with(tag) == []
