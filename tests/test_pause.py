"""Pause points (shared/core/pause.py): what the fault-injection suite stops the services with."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from snapscale.shared.core import pause


def test_the_setting_names_one_point_and_its_flag_file() -> None:
    assert pause.wanted("upload", "upload:/tmp/f") == Path("/tmp/f")
    assert pause.wanted("upload", "criu_dump:/tmp/f") is None
    assert pause.wanted("upload", None) is None
    assert pause.wanted("upload", "") is None
    assert pause.wanted("upload", "upload") is None  # no flag file: nothing to tell the test by
    assert pause.wanted("upload", "upload:") is None


async def test_the_named_point_flags_and_waits_and_the_others_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "paused"
    monkeypatch.setenv(pause.ENV, f"materialize:{flag}")
    await asyncio.wait_for(pause.pause_point("prefetch"), 1.0)
    assert not flag.exists()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pause.pause_point("materialize"), 0.3)
    assert flag.exists()
