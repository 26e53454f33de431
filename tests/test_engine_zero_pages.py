"""The engine's freeze drops the image's zero pages while it brings the sandbox back (or stops it),
not after; a pass that fails half-way fails the freeze. Real CRIU, the torch-free sample."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest
from engine_fixtures import answer, made, tag
from engine_helpers import sample_spec

from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import sandbox, zeropages
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.lifecycle import Sandbox

pytestmark = pytest.mark.criu
__all__ = ["made", "tag"]  # fixtures


async def test_zero_pages_go_beside_the_sandbox_coming_back_and_a_broken_pass_fails_the_freeze(
    criu: CriuBinary, tmp_path: Path, tag: str, made: list[Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = sample_spec("light", tag=tag, preset="none")
    sb = await engine.launch(spec, "zeros", gpu_uuids=[], run_dir=tmp_path / "run")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    original = await answer(sb)
    real_drop, real_hook, real_stop = zeropages.drop_zero_pages, engine._hook, engine.stop
    started = threading.Event()
    ended: list[Path] = []

    def broken(image_dir: Path, workers: int | None = None) -> zeropages.DropReport:
        started.set()
        ended.append(image_dir)
        raise OSError(errno.EIO, "Input/output error")

    async def hook(name: str, *args: object) -> bytes:
        if name == "after_restore":  # the sandbox is being brought back: the pass is under way
            assert await asyncio.to_thread(started.wait, 30), "the zero pages waited for the resume"
        return await real_hook(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(zeropages, "drop_zero_pages", broken)
    monkeypatch.setattr(engine, "_hook", hook)
    with pytest.raises(engine.CriuError) as ei:
        await engine.freeze(sb, spec, tmp_path / "img-broken", keep_running=True, criu=criu)
    assert ei.value.step == "drop_zero_pages" and "Input/output error" in ei.value.reason
    assert ended == [tmp_path / "img-broken"]
    assert sandbox.is_running(sb) and await answer(sb) == original  # it kept serving

    started.clear()

    def drop(image_dir: Path, workers: int | None = None) -> zeropages.DropReport:
        started.set()
        return real_drop(image_dir, workers)

    async def stop(s: Sandbox) -> None:
        assert await asyncio.to_thread(started.wait, 30), "the zero pages waited for the stop"
        await real_stop(s)

    monkeypatch.setattr(zeropages, "drop_zero_pages", drop)
    monkeypatch.setattr(engine, "stop", stop)
    img = tmp_path / "img"
    rep = await engine.freeze(sb, spec, img, keep_running=False, criu=criu)
    assert {"drop_zero_pages", "drop_zero_pages_wait", "close_external_tcp"} <= rep.timings_s.keys()
    assert rep.image_bytes == sum(p.stat().st_size for p in img.rglob("*") if p.is_file())
    monkeypatch.undo()
    back, _ = await engine.restore(
        spec, img, "zeros-back", gpu_uuids=[], run_dir=tmp_path / "run-back", criu=criu, checkpoint_id="z"
    )
    made.append(back)
    assert await answer(back) == original
