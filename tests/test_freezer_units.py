"""The freezer's pure decisions, checkpoint ids, crash-safe ledger, and auto-freeze claims on a
real nats-server (two claimants race; one wins)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from snapscale.freezer import claims, job
from snapscale.freezer.decide import (
    Action,
    Claim,
    ClaimVerdict,
    after_claim,
    before_claim,
    judge_claim,
)
from snapscale.freezer.ids import is_checkpoint_id, new_checkpoint_id
from snapscale.freezer.ledger import Attempt, Ledger, Phase
from snapscale.freezer.operator import Target, format_event, pick_target
from snapscale.freezer.specs import SpecUnknown, pick_revision
from snapscale.shared import bus
from snapscale.shared.bus.catalog import CatalogEntry
from snapscale.shared.bus.messages import CheckpointEvent, FreezeCommand, ReplicaEvent, ReplicaState
from snapscale.shared.bus.subjects import Bucket
from snapscale.shared.core.errors import NotFoundError
from snapscale.shared.store.backend import StoreError
from snapscale.shared.store.checkpoint import EarlyUpload


def cmd(*, force: bool = False, id: str = "c1") -> FreezeCommand:
    return FreezeCommand(id=id, deployment="d", replica="r1", issued_at=0.0, force=force)


ENTRY = CatalogEntry(
    deployment="d", compat_hash="k", checkpoint_id="X", manifest_key="m", created_at=1.0, host="h2"
)


def test_checkpoint_ids_sort_by_time_and_are_unique() -> None:
    a = new_checkpoint_id(1_790_000_000.001)
    b = new_checkpoint_id(1_790_000_000.002)
    c = new_checkpoint_id(1_790_000_100.0)
    assert a < b < c
    assert a == "20260921T141320001Z-" + a[-6:]
    assert all(is_checkpoint_id(x) for x in (a, b, c))
    assert len({new_checkpoint_id(5.0) for _ in range(200)}) == 200
    assert not is_checkpoint_id("../etc") and not is_checkpoint_id("20260921T141320001Z-zzzzzz")


@pytest.mark.parametrize(
    ("command", "done", "catalog", "expected"),
    [
        (cmd(), True, None, Action.REPLAY),
        (cmd(force=True), True, ENTRY, Action.REPLAY),
        (cmd(force=True), False, ENTRY, Action.FREEZE),
        (cmd(), False, ENTRY, Action.SKIP),
        (cmd(), False, None, None),
    ],
)
def test_before_claim(
    command: FreezeCommand, done: bool, catalog: CatalogEntry | None, expected: Action | None
) -> None:
    d = before_claim(command, done=done, catalog=catalog)
    assert (d.action if d else None) == expected
    if expected is Action.SKIP:
        assert d is not None and "X" in d.reason and "h2" in d.reason and d.checkpoint_id == "X"


def test_judge_claim_table() -> None:
    live = Claim(host="h2", command_id="c9", expires_at=100.0)
    assert judge_claim(None, host="h1", command_id="c1", now=50.0) is ClaimVerdict.CREATE
    assert judge_claim(live, host="h1", command_id="c1", now=50.0) is ClaimVerdict.HELD
    assert judge_claim(live, host="h1", command_id="c1", now=100.0) is ClaimVerdict.TAKE
    assert judge_claim(live, host="h2", command_id="c9", now=50.0) is ClaimVerdict.OURS
    # same host, other command: still someone else's freeze
    assert judge_claim(live, host="h2", command_id="c1", now=50.0) is ClaimVerdict.HELD
    held = after_claim(ClaimVerdict.HELD, live)
    assert held.action is Action.SKIP and "h2" in held.reason and "c9" in held.reason
    assert after_claim(ClaimVerdict.TAKE, live).action is Action.FREEZE


def test_ledger_survives_a_restart_and_sweeps_what_cannot_resume(tmp_path: Path) -> None:
    T0 = 1_790_000_000.0
    led = Ledger(tmp_path)
    a = Attempt(
        command_id="c1",
        deployment="d",
        replica="r1",
        checkpoint_id="ck1",
        staging_dir=str(led.staging_dir("ck1")),
        phase=Phase.FREEZING,
        started_at=T0,
    )
    led.save(a)
    led.staging_dir("ck1").mkdir()
    led.staging_dir("orphan").mkdir()
    (led.staging_dir("ck1") / "pages-1.img").write_bytes(b"x" * 10)

    again = Ledger(tmp_path)  # a restarted process
    assert again.attempt("c1") == a
    assert sorted(again.sweep(now=T0 + 60)) == ["ck1", "orphan"]  # a FREEZING image is partial: gone

    led.save(a.advance(Phase.DUMPED, sizes={"total": 10}))
    led.staging_dir("ck1").mkdir()
    assert again.sweep(now=T0 + 60) == []  # a DUMPED image is resumable: kept
    got = again.attempt("c1")
    assert got is not None and got.phase is Phase.DUMPED and got.sizes == {"total": 10}

    # an attempt whose command never came back within any redelivery window is given up
    assert again.sweep(now=T0 + 4 * 24 * 3600) == ["ck1"] and again.attempt("c1") is None
    led.save(a.advance(Phase.DUMPED))

    ev = CheckpointEvent(deployment="d", host="h", ok=True, ts=2.0, command_id="c1", checkpoint_id="ck1")
    again.finish("c1", ev, "ck1")
    assert again.outcome("c1") == ev
    assert again.attempt("c1") is None and not led.staging_dir("ck1").exists()
    assert Ledger(tmp_path).outcome("c1") == ev


def test_ledger_never_lets_an_id_pick_a_path(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    # (the decoder refuses such an id in a message; the ledger is safe without that)
    ev = CheckpointEvent(deployment="d", host="h", ok=False, ts=2.0, command_id="c9")
    led.finish("../../x y", ev)
    assert led.outcome("../../x y") == ev
    assert [p.parent for p in tmp_path.rglob("*.json")] == [led.done_dir]


def test_ledger_unreadable_record_is_a_fresh_start(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    a = Attempt("c1", "d", "r1", "ck1", str(led.staging_dir("ck1")), Phase.DUMPED, started_at=1.0)
    led.save(a)
    led.finish("c2", CheckpointEvent(deployment="d", host="h", ok=True, ts=1.0, command_id="c2"))
    assert led.attempt("c1") == a and led.outcome("c2") is not None
    (attempt_file,) = led.inflight_dir.glob("*.json")
    attempt_file.write_bytes(b"{not json")
    (outcome_file,) = led.done_dir.glob("*.json")
    outcome_file.write_bytes(b"[]")
    assert led.attempt("c1") is None and led.attempts() == []
    assert led.outcome("c2") is None
    assert led.sweep(now=1.0) == []  # unreadable records are skipped, never fatal


async def test_claim_race_one_wins(the_bus: bus.Bus) -> None:
    kv = the_bus.kv[Bucket.LEASES]
    now = time.time()
    results = await asyncio.gather(
        *(
            claims.try_claim(kv, "d", "k1", host=f"h{i}", command_id=f"c{i}", now=now, ttl_s=60)
            for i in range(6)
        )
    )
    winners = [h for h, _ in results if h is not None]
    losers = [holder for h, holder in results if h is None]
    assert len(winners) == 1
    assert len(losers) == 5 and all(x == winners[0].claim for x in losers)

    w = winners[0]
    # the winner's redelivered command is still its own claim
    again, _ = await claims.try_claim(
        kv, "d", "k1", host=w.claim.host, command_id=w.claim.command_id, now=now + 1, ttl_s=60
    )
    assert again is not None
    renewed = await claims.renew(kv, again, now=now + 2, ttl_s=60)
    assert renewed.claim.expires_at == now + 62

    # a dead holder's claim expires and is taken over; the old holder cannot renew it any more
    taker, _ = await claims.try_claim(kv, "d", "k1", host="hx", command_id="cx", now=now + 1000, ttl_s=60)
    assert taker is not None
    with pytest.raises(Exception, match="written concurrently"):
        await claims.renew(kv, renewed, now=now + 1000, ttl_s=60)
    await claims.release(kv, renewed)  # a lost claim's release leaves the new holder alone
    still, holder = await claims.try_claim(
        kv, "d", "k1", host="hy", command_id="cy", now=now + 1001, ttl_s=60
    )
    assert still is None and holder is not None and holder.host == "hx"

    await claims.release(kv, taker)
    free, _ = await claims.try_claim(kv, "d", "k1", host="hy", command_id="cy", now=now + 1002, ttl_s=60)
    assert free is not None  # a released key can be claimed again (create over a delete marker)


def _rep(replica: str, host: str, state: ReplicaState, ts: float, deployment: str = "d") -> ReplicaEvent:
    return ReplicaEvent(deployment=deployment, replica=replica, host=host, state=state, ts=ts)


def test_pick_target_prefers_the_oldest_ready_replica() -> None:
    reps = [
        _rep("r3", "h1", ReplicaState.READY, 30.0),
        _rep("r1", "h2", ReplicaState.STARTING, 10.0),
        _rep("r2", "h2", ReplicaState.READY, 20.0),
        _rep("x1", "h9", ReplicaState.READY, 1.0, deployment="other"),
    ]
    assert pick_target(reps, "d", replica=None, host=None) == Target("r2", "h2")
    assert pick_target(reps, "d", replica=None, host="h1") == Target("r3", "h1")
    assert pick_target(reps, "d", replica="r1", host=None) == Target("r1", "h2")
    assert pick_target([], "d", replica="r7", host="h7") == Target("r7", "h7")
    with pytest.raises(NotFoundError, match=r"no ready replica of d on h3 \(replicas: r3@h1=ready"):
        pick_target(reps, "d", replica=None, host="h3")
    with pytest.raises(NotFoundError, match="r7 of d is not in KV"):
        pick_target(reps, "d", replica="r7", host=None)


def test_format_event_says_sizes_timings_and_failures() -> None:
    ok = CheckpointEvent(
        deployment="d",
        host="h",
        ok=True,
        ts=0.0,
        replica="r1",
        checkpoint_id="ck",
        compat_hash="ab" * 32,
        sizes={"total": 120_000_000, "new": 5_000_000},
        timings_s={"criu_dump_s": 0.5},
    )
    text = format_event(ok)
    assert "checkpoint ck of d" in text and "total 114.4MiB" in text and "new 4.8MiB" in text
    assert "criu_dump_s 0.50s" in text
    bad = CheckpointEvent(deployment="d", host="h", ok=False, ts=0.0, replica="r1", reason="criu_dump: boom")
    assert format_event(bad) == "freeze of d/r1 on h FAILED: criu_dump: boom"
    skipped = CheckpointEvent(
        deployment="d", host="h", ok=True, ts=0.0, replica="r1", skipped=True, reason="x"
    )
    assert "skipped: x" in format_event(skipped)


def test_pick_revision_is_the_spec_current_when_the_sandbox_started() -> None:
    revs: list[tuple[float, bytes | None]] = [(10.0, b"v1"), (20.0, b"v2"), (30.0, None), (40.0, b"v3")]
    assert pick_revision(revs, 15.0) == b"v1"
    assert pick_revision(revs, 20.0) == b"v2"
    assert pick_revision(revs, 99.0) == b"v3"
    with pytest.raises(SpecUnknown, match="no longer reaches back"):
        pick_revision(revs, 5.0)
    with pytest.raises(SpecUnknown, match="had no spec"):
        pick_revision(revs, 35.0)


def test_an_attempt_whose_checkpoint_id_would_leave_staging_is_quarantined(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = Attempt("c1", "d", "r1", "../../outside", str(outside), Phase.DUMPED, started_at=1.0)
    led.save(bad)  # written by hand: no freeze makes such an id
    led.save(Attempt("c2", "d", "r1", "ck2", "", Phase.DUMPED, started_at=1.0))
    again = Ledger(tmp_path)
    assert [a.command_id for a in again.attempts()] == ["c2"]
    assert again.attempt("c1") is None
    again.sweep(now=2.0)
    assert outside.is_dir(), "nothing outside staging is touched"
    assert len(list((again.inflight_dir / "quarantine").glob("*.json"))) == 1
    with pytest.raises(ValueError, match="checkpoint id"):
        again.staging_dir("../x")


async def test_an_early_weights_upload_that_failed_leaves_them_to_the_image_upload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failed() -> EarlyUpload:
        raise StoreError("weights file /m.safetensors: No such file or directory")

    async def done() -> EarlyUpload:
        return EarlyUpload(frozenset({"d"}), 8, 1, 0.0, 0.1)

    assert await job._early_result(None) is None
    assert await job._early_result(asyncio.create_task(done())) == await done()
    with caplog.at_level("WARNING", logger="snapscale.freezer.job"):
        assert await job._early_result(asyncio.create_task(failed())) is None
    assert "early upload failed, they go up with the image: weights file /m.safetensors" in caplog.text
