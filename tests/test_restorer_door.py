"""The restorer's door: a scale-up the decoder refuses never reaches the ledger, and fails the
replica it names only when the scaler placed that replica here; a ledger entry that cannot be
replayed at start is quarantined, not fatal; run and image dirs come from validated ids only.
Real NATS, store and CRIU, the service in-process."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from engine_helpers import kill_tagged
from restorer_harness import Harness, follow, running

from snapscale.restorer.host import HostTools
from snapscale.restorer.ledger import Entry, Ledger
from snapscale.shared import bus
from snapscale.shared.bus.messages import ReplicaEvent, ReplicaState, ScaleUpCommand, Tier, encode_message
from snapscale.shared.bus.subjects import Bucket, Verb, replica_key
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"rdoor-{uuid.uuid4().hex[:10]}"
    harness = Harness(settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def place(h: Harness, deployment: str, replica: str, host: str) -> None:
    """What the scaler writes beside a scale-up command: the replica pending on `host`."""
    ev = ReplicaEvent(deployment, replica, host, ReplicaState.PENDING, time.time(), command_id="c-placed")
    await h.bus.kv[Bucket.REPLICAS].put(replica_key(deployment, replica), encode_message(ev))


def raw_scale_up(deployment: str, replica: str, **over: object) -> bytes:
    cmd = ScaleUpCommand(id=f"bad-{uuid.uuid4().hex[:8]}", deployment=deployment, replica=replica,
                         issued_at=time.time(), allow_tiers=[Tier.COLD])  # fmt: skip
    return orjson.dumps({**orjson.loads(encode_message(cmd)), **over})


async def test_a_refused_scale_up_fails_the_replica_placed_here_and_reaches_no_ledger(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    subject = h.bus.subjects.cmd(Verb.SCALE_UP, h.host)
    async with running(h.settings, h.criu) as (svc, _):
        # placed here by a scaler, sent with an absurd deadline: failed at once, with the reason
        await place(h, spec.name, "r-placed", h.host)
        await h.bus.js.publish(subject, raw_scale_up(spec.name, "r-placed", deadline_s=1e9))
        ev = await h.wait("r-placed", timeout_s=20)
        assert ev.state is ReplicaState.FAILED and ev.host == h.host
        assert ev.reason.startswith("scale-up command refused: scale-up.deadline_s: must be within")
        # placed on another host, or on none: a bad command fails nothing it did not start
        await place(h, spec.name, "r-elsewhere", "host-b")
        await h.bus.js.publish(subject, raw_scale_up(spec.name, "r-elsewhere", issued_at="now"))
        await h.bus.js.publish(subject, raw_scale_up(spec.name, "r-nowhere", deadline_s=-1))
        await h.bus.js.publish(subject, raw_scale_up(spec.name, "../../r", deadline_s=-1))
        # then a normal scale-up: served as ever
        await h.restore(spec.name, "r-good", allow_tiers=[Tier.COLD])
        ok = await h.wait("r-good", timeout_s=60)
        assert ok.state is ReplicaState.READY, ok.reason
        assert svc.host is not None
        ledger = svc.host.tools.ledger
        assert [e.replica for e in ledger.entries.records()] == ["r-good"], "nothing refused was recorded"
    assert [e.state for e in h.of("r-elsewhere") + h.of("r-nowhere")] == []
    got = await bus.kv_get(h.bus.kv[Bucket.REPLICAS], replica_key(spec.name, "r-elsewhere"))
    assert got is not None and ReplicaState.PENDING.value in got[0].decode()


async def test_ledger_entries_that_cannot_be_replayed_are_quarantined_and_the_restorer_serves(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    spec = await h.deploy(h.spec())
    commands = h.settings.state_dir / "restorer" / "commands"
    ledger = Ledger(commands)  # what a crash (or a hand, or an older build) may have left
    # Each names a path elsewhere, where a bystander runs: a replay reaps the run dir of its ids,
    # never the one an entry holds (the old replay of "c-empty" reaped "", the restorer's own cwd).
    elsewhere = h.tmp / "bystander"
    elsewhere.mkdir()
    bystander = _sleeper(elsewhere)
    for command_id, deployment, replica in (
        ("c-dot", "a.b", "r1"),  # a subject cannot take it
        ("c-empty", spec.name, ""),  # names no replica
        ("c-far", spec.name, "r2"),  # good ids
    ):
        ledger.start(Entry(command_id, "scale-up", deployment, replica, time.time(), run_dir=str(elsewhere)))
    (commands / "garbage.json").write_bytes(b"\x00{not json")
    try:
        await _serve_after_quarantine(h, spec.name)
        assert bystander.poll() is None, "a process outside the restorer's run dirs was reaped"
    finally:
        bystander.kill()
        bystander.wait()
    aside = sorted(p.name for p in (commands / "quarantine").iterdir())
    assert len(aside) == 3 and "garbage.json" in aside
    assert "restorer-command.deployment: 'a.b' must match" in caplog.text
    assert "cannot be replayed: replica: must not be empty" in caplog.text
    assert [e.id for e in Ledger(commands).unfinished()] == []


def _sleeper(cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "120"], cwd=cwd)


async def _serve_after_quarantine(h: Harness, deployment: str) -> None:
    async with running(h.settings, h.criu):
        # it started: the entry with good ids was replayed (r2 failed, from its ids' run dir) ...
        ev = await h.wait("r2", timeout_s=20)
        assert ev.state is ReplicaState.FAILED and ev.command_id == "c-far"
        # ... and the others were moved aside, each with a log line, and it serves as ever
        await h.restore(deployment, "r-good", allow_tiers=[Tier.COLD])
        ok = await h.wait("r-good", timeout_s=60)
        assert ok.state is ReplicaState.READY, ok.reason


def test_run_and_image_dirs_come_from_validated_ids_only(settings: Settings, tmp_path: Path) -> None:
    from dataclasses import replace

    from snapscale.restorer.config import RestorerConfig

    cfg = RestorerConfig(host="h1", work_dir=tmp_path / "work")
    tools = replace(_tools_stub(), settings=settings, config=cfg)
    run = tools.run_dir("r-1", "c-1")
    assert run.parent == tmp_path / "work" / "run" and run.name.startswith("r-1.")
    assert tools.image_dir("r-1", "c-1") == tmp_path / "work" / "images" / run.name
    for replica, command_id in (("../r", "c"), ("r/x", "c"), ("", "c"), ("r" * 129, "c"), ("r", "c/../d")):
        with pytest.raises(ValueError, match=r"replica|command id"):
            tools.run_dir(replica, command_id)
        with pytest.raises(ValueError, match=r"replica|command id"):
            tools.image_dir(replica, command_id)


def _tools_stub() -> HostTools:
    """HostTools whose run_dir/image_dir alone are used: the rest is never touched."""
    none: object = None
    return HostTools(none, none, none, none, none, none, none, none, none, none)  # type: ignore[arg-type]
