"""The sandbox registry on a real directory: atomic records that survive a restart, bad input refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.registry import SandboxRegistry
from snapscale.shared.engine.sandbox import Sandbox


def sb(replica: str, pid: int = 42) -> Sandbox:
    return Sandbox(
        replica=replica,
        deployment="dep",
        pid=pid,
        netns="snapscale-7",
        endpoint="10.213.0.30:8000",
        gpu_uuids=["GPU-00000000-0000-0000-0000-000000000001"],
        log_path="/tmp/x/sandbox.log",
        started_at=1.5,
        checkpoint_id="ck",
        run_dir="/tmp/x",
    )


def test_put_get_remove_all(tmp_path: Path) -> None:
    reg = SandboxRegistry(tmp_path)
    assert reg.get("a") is None and reg.all() == []
    reg.put(sb("a"))
    reg.put(sb("b"))
    reg.put(sb("a", pid=43))  # replaces
    again = SandboxRegistry(tmp_path)  # a restarted agent reads the same records
    assert again.get("a") == sb("a", pid=43)
    assert [s.replica for s in again.all()] == ["a", "b"]
    again.remove("a")
    again.remove("a")  # idempotent
    assert [s.replica for s in reg.all()] == ["b"]
    assert not list((tmp_path / "sandboxes").glob(".*tmp"))  # no temp files left behind


def test_replica_ids_cannot_escape_the_directory(tmp_path: Path) -> None:
    reg = SandboxRegistry(tmp_path)
    with pytest.raises(EngineError, match="must match"):
        reg.put(sb("../evil"))
    with pytest.raises(EngineError, match="must match"):
        reg.get("a/b")


def test_a_corrupt_record_is_skipped_not_fatal(tmp_path: Path) -> None:
    reg = SandboxRegistry(tmp_path)
    reg.put(sb("good"))
    (tmp_path / "sandboxes" / "bad.json").write_text("{not json")
    (tmp_path / "sandboxes" / "list.json").write_text("[1, 2]")
    (tmp_path / "sandboxes" / "partial.json").write_text('{"replica": "partial"}')
    assert [s.replica for s in reg.all()] == ["good"]
    assert reg.get("bad") is None


def test_sandbox_json_round_trip() -> None:
    s = sb("r")
    import json

    assert Sandbox.from_dict(json.loads(s.to_json())) == s
