"""Wire format: every message round-trips, and malformed input is one typed error naming the field."""

from __future__ import annotations

import orjson
import pytest

from snapscale.shared import bus
from snapscale.shared.bus.messages import decode_command
from snapscale.shared.core.errors import MessageError

SAMPLES: list[object] = [
    bus.TrafficEvent(deployment="llm", ts=1.5, arrivals=3, concurrency=2.5),
    bus.ScaleUpCommand(id="c1", deployment="llm", replica="r1", issued_at=2.0, gpu_uuids=["GPU-a"]),
    bus.ReleaseCommand(id="c2", deployment="llm", replica="r1", issued_at=3.0, mode=bus.ReleaseMode.SUSPEND),
    bus.PrefetchCommand(id="c3", deployment="llm", issued_at=4.0, checkpoint_id="ck1"),
    bus.FreezeCommand(id="c4", deployment="llm", replica="r1", issued_at=5.0, keep_running=False),
    bus.ReplicaEvent(
        deployment="llm",
        replica="r1",
        host="h",
        state=bus.ReplicaState.READY,
        ts=6.0,
        tier=bus.Tier.STORE,
        reason="no suspended replica",
        timings_s={"criu_restore": 1.25},
        bytes={"prefetched": 10},
    ),
    bus.CheckpointEvent(deployment="llm", host="h", ok=True, ts=7.0, sizes={"total": 5}),
    bus.HostHeartbeat(
        host="h",
        ts=8.0,
        compat_hash="abc",
        gpus=[bus.GpuInfo(index=0, uuid="GPU-a", model="H100", memory_bytes=80 << 30, free=False)],
        replicas=[bus.ReplicaSummary(deployment="llm", replica="r1", state=bus.ReplicaState.SUSPENDED)],
    ),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    data = bus.encode_message(msg)  # type: ignore[arg-type]
    assert bus.decode_message(data, type(msg)) == msg  # type: ignore[type-var]


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
        bus.decode_message(body, bus.TrafficEvent)
    assert ei.value.field == "traffic.arrivals"


def test_nested_field_path() -> None:
    hb = orjson.loads(bus.encode_message(SAMPLES[-1]))  # type: ignore[arg-type]
    hb["gpus"][0]["memory_bytes"] = "lots"
    with pytest.raises(MessageError) as ei:
        bus.decode_message(orjson.dumps(hb), bus.HostHeartbeat)
    assert ei.value.field == "host.gpus[0].memory_bytes"


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (bus.ReplicaState.PENDING, bus.ReplicaState.RESTORING, True),
        (bus.ReplicaState.RESTORING, bus.ReplicaState.STARTING, True),  # fallback to cold boot
        (bus.ReplicaState.READY, bus.ReplicaState.RELEASING, True),
        (bus.ReplicaState.READY, bus.ReplicaState.RESTORING, False),
        (bus.ReplicaState.STOPPED, bus.ReplicaState.READY, False),
        (bus.ReplicaState.SUSPENDED, bus.ReplicaState.RESUMING, True),
        (bus.ReplicaState.STARTING, bus.ReplicaState.FAILED, True),
        (bus.ReplicaState.STOPPED, bus.ReplicaState.FAILED, False),
    ],
)
def test_transitions(old: bus.ReplicaState, new: bus.ReplicaState, ok: bool) -> None:
    assert bus.can_transition(old, new) is ok


# --- declared limits: what the decoder refuses, naming the field and the reason ---------------
def _scale_up(**over: object) -> bytes:
    body: dict[str, object] = {"v": 1, "type": "scale-up", "id": "c1", "deployment": "d", "replica": "r1"}
    body["issued_at"] = 1.0
    body.update(over)
    return orjson.dumps(body)


@pytest.mark.parametrize(
    ("over", "field", "reason_part"),
    [
        ({"deployment": "a.b"}, "scale-up.deployment", "must match [A-Za-z0-9_-]+"),
        ({"deployment": "llm.>"}, "scale-up.deployment", "must match"),
        ({"replica": "../../etc"}, "scale-up.replica", "must match"),
        ({"replica": "r/1"}, "scale-up.replica", "must match"),
        ({"replica": ""}, "scale-up.replica", "must not be empty"),
        ({"replica": "r" * 200_000}, "scale-up.replica", "200000 characters, over the limit of 128"),
        ({"deployment": "d" * 65}, "scale-up.deployment", "over the limit of 64"),
        ({"id": "a b"}, "scale-up.id", "must match"),
        ({"checkpoint_id": "ck/1"}, "scale-up.checkpoint_id", "must match"),
        ({"gpu_uuids": ["GPU-0", "GPU-1,GPU-2"]}, "scale-up.gpu_uuids[1]", "must match"),
        ({"issued_at": -5}, "scale-up.issued_at", "within [0, 1e+10]"),
        ({"deadline_s": 1.7e308}, "scale-up.deadline_s", "within"),
        ({"deadline_s": -1}, "scale-up.deadline_s", "within [0, 604800]"),
        ({"allow_tiers": "cold"}, "scale-up.allow_tiers", "expected a list"),
        ({"replcia": "r2"}, "scale-up.'replcia'", "unknown field"),
    ],
)
def test_declared_limits_refuse_with_the_field_and_reason(
    over: dict[str, object], field: str, reason_part: str
) -> None:
    with pytest.raises(MessageError) as ei:
        decode_command(_scale_up(**over), "scale-up")
    assert ei.value.field == field
    assert reason_part in ei.value.reason
    assert len(str(ei.value)) < 300, "an error never echoes a huge value"


def test_the_same_command_within_its_limits_decodes() -> None:
    cmd = decode_command(_scale_up(replica="r" * 128, deployment="d" * 64, gpu_uuids=["GPU-0"]), "scale-up")
    assert isinstance(cmd, bus.ScaleUpCommand) and len(cmd.replica) == 128


def test_a_number_past_a_double_is_refused_at_the_body() -> None:
    body = _scale_up(deadline_s=0).replace(b'"deadline_s":0', b'"deadline_s":' + b"9" * 400)
    with pytest.raises(MessageError) as ei:
        decode_command(body, "scale-up")
    assert ei.value.field == "<body>" and "infinity" in ei.value.reason


def test_a_message_over_the_size_limit_is_refused_unread() -> None:
    from snapscale.shared.bus.messages import MAX_MESSAGE_BYTES

    body = _scale_up(pad=None)[:-1] + b',"x":"' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(MessageError) as ei:
        decode_command(body, "scale-up")
    assert ei.value.field == "<body>" and f"over the limit of {MAX_MESSAGE_BYTES}" in ei.value.reason


@pytest.mark.parametrize("value", [1.7e308, -1.0])
def test_traffic_concurrency_out_of_range_is_refused(value: float) -> None:
    body = orjson.dumps({"v": 1, "type": "traffic", "deployment": "d", "ts": 1.0, "concurrency": value})
    with pytest.raises(MessageError) as ei:
        bus.decode_message(body, bus.TrafficEvent)
    assert ei.value.field == "traffic.concurrency" and "within [0, 1e+06]" in ei.value.reason


def test_dict_keys_are_checked_too() -> None:
    hb = orjson.loads(bus.encode_message(SAMPLES[-1]))  # type: ignore[arg-type]
    hb["cached_bytes"] = {"ck-1": 5, "../ck": 6}
    with pytest.raises(MessageError) as ei:
        bus.decode_message(orjson.dumps(hb), bus.HostHeartbeat)
    assert ei.value.field == "host.cached_bytes.../ck (key)" and "must match" in ei.value.reason


def test_non_finite_numbers_are_refused_from_python_callers_too() -> None:
    from snapscale.shared.core import wire

    with pytest.raises(MessageError) as ei:
        wire.from_plain(bus.TrafficEvent, {"deployment": "d", "ts": float("nan")})
    assert ei.value.field == "TrafficEvent.ts" and "finite" in ei.value.reason


def test_check_token_applies_the_decoders_rule() -> None:
    from snapscale.shared.bus.subjects import check_token

    assert check_token("deployment", "llm-1_a") == "llm-1_a"
    for bad, why in (("a.b", "must match"), ("x" * 65, "over the limit of 64"), ("", "empty")):
        with pytest.raises(ValueError, match=why):
            check_token("deployment", bad)


def test_salvage_keeps_only_the_fields_that_pass_their_own_limits() -> None:
    from snapscale.shared.bus.messages import MAX_MESSAGE_BYTES, salvage

    names = ("deployment", "replica", "id")
    body = _scale_up(deployment="a.b", replica="r-1", id=7, issued_at="now")
    assert salvage(body, bus.ScaleUpCommand, names) == {"replica": "r-1"}
    assert salvage(b"[1]", bus.ScaleUpCommand, names) == {} == salvage(b"{x", bus.ScaleUpCommand, names)
    huge = _scale_up()[:-1] + b',"pad":"' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    assert salvage(huge, bus.ScaleUpCommand, names) == {}
