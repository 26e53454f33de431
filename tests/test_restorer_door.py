"""The restorer's door: a scale-up the decoder refuses never reaches the ledger, and fails the
replica it names only when the scaler placed that replica here; a ledger entry that cannot be
replayed at start is quarantined, not fatal; run and image dirs come from validated ids only.
Real NATS, store and CRIU, the service in-process."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from engine_helpers import kill_tagged
from restorer_harness import Harness, follow, running

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
