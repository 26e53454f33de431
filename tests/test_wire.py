"""Wire format: every message round-trips, and malformed input is one typed error naming the field."""

from __future__ import annotations

import orjson
import pytest

from snapscale.shared.bus.messages import (
    CheckpointEvent,
    FreezeCommand,
    GpuInfo,
    HostHeartbeat,
    PrefetchCommand,
    ReleaseCommand,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
    ReplicaSummary,
    ScaleUpCommand,
    Tier,
    TrafficEvent,
    can_transition,
    decode_command,
    decode_message,
    encode_message,
)
from snapscale.shared.core.errors import MessageError

SAMPLES: list[object] = [
    TrafficEvent(deployment="llm", ts=1.5, arrivals=3, concurrency=2.5),
    ScaleUpCommand(id="c1", deployment="llm", replica="r1", issued_at=2.0, gpu_uuids=["GPU-a"]),
    ReleaseCommand(id="c2", deployment="llm", replica="r1", issued_at=3.0, mode=ReleaseMode.SUSPEND),
    PrefetchCommand(id="c3", deployment="llm", issued_at=4.0, checkpoint_id="ck1"),
    FreezeCommand(id="c4", deployment="llm", replica="r1", issued_at=5.0, keep_running=False),
    ReplicaEvent(
        deployment="llm",
        replica="r1",
        host="h",
        state=ReplicaState.READY,
        ts=6.0,
        tier=Tier.STORE,
        reason="no suspended replica",
        timings_s={"criu_restore": 1.25},
        bytes={"prefetched": 10},
    ),
    CheckpointEvent(deployment="llm", host="h", ok=True, ts=7.0, sizes={"total": 5}),
    HostHeartbeat(
        host="h",
        ts=8.0,
        compat_hash="abc",
        gpus=[GpuInfo(index=0, uuid="GPU-a", model="H100", memory_bytes=80 << 30, free=False)],
        replicas=[ReplicaSummary(deployment="llm", replica="r1", state=ReplicaState.SUSPENDED)],
    ),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    data = encode_message(msg)  # type: ignore[arg-type]
    assert decode_message(data, type(msg)) == msg  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("body", "field", "reason_part"),
    [
        (b"not json", "<body>", "not JSON"),
        (b"[1,2]", "<body>", "JSON object"),
        (b'{"type":"scale-up","id":"x"}', "v", "schema version"),
        (b'{"v":1,"type":"release","id":"x"}', "type", "expected 'scale-up'"),
        (b'{"v":1,"type":"scale-up","id":"x","replica":"r","issued_at":1}', "scale-up.deployment", "missing"),
        (
            b'{"v":1,"type":"scale-up","id":5,"deployment":"d","replica":"r","issued_at":1}',
            "scale-up.id",
            "expected str",
        ),
        (
            b'{"v":1,"type":"scale-up","id":"x","deployment":"d","replica":"r","issued_at":"now"}',
            "scale-up.issued_at",
            "number",
        ),
        (
            b'{"v":1,"type":"scale-up","id":"x","deployment":"d","replica":"r","issued_at":1,"gpu_uuids":"GPU-a"}',
            "scale-up.gpu_uuids",
            "list",
        ),
        (
            b'{"v":1,"type":"scale-up","id":"x","deployment":"d","replica":"r","issued_at":1,"allow_tiers":["warp"]}',
            "scale-up.allow_tiers[0]",
            "one of",
        ),
    ],
)
def test_malformed_scale_up_names_the_field(body: bytes, field: str, reason_part: str) -> None:
    with pytest.raises(MessageError) as ei:
        decode_command(body, "scale-up")
    assert ei.value.field == field
    assert reason_part in ei.value.reason


def test_bool_is_not_an_int() -> None:
    body = orjson.dumps({"v": 1, "type": "traffic", "deployment": "d", "ts": 1.0, "arrivals": True})
    with pytest.raises(MessageError) as ei:
        decode_message(body, TrafficEvent)
    assert ei.value.field == "traffic.arrivals"


def test_nested_field_path() -> None:
    hb = orjson.loads(encode_message(SAMPLES[-1]))  # type: ignore[arg-type]
    hb["gpus"][0]["memory_bytes"] = "lots"
    with pytest.raises(MessageError) as ei:
        decode_message(orjson.dumps(hb), HostHeartbeat)
    assert ei.value.field == "host.gpus[0].memory_bytes"


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (ReplicaState.PENDING, ReplicaState.RESTORING, True),
        (ReplicaState.RESTORING, ReplicaState.STARTING, True),  # fallback to cold boot
        (ReplicaState.READY, ReplicaState.RELEASING, True),
        (ReplicaState.READY, ReplicaState.RESTORING, False),
        (ReplicaState.STOPPED, ReplicaState.READY, False),
        (ReplicaState.SUSPENDED, ReplicaState.RESUMING, True),
        (ReplicaState.STARTING, ReplicaState.FAILED, True),
        (ReplicaState.STOPPED, ReplicaState.FAILED, False),
    ],
)
def test_transitions(old: ReplicaState, new: ReplicaState, ok: bool) -> None:
    assert can_transition(old, new) is ok
