"""A refused freeze, pure parts: the named reason from the engine's error, the record kept per
deployment and key (bus/refusals.py), and the freezer's decision to skip an auto-freeze of a key
that was refused. The real thing, through the services: tests/fidelity/test_refused.py."""

from __future__ import annotations

from dataclasses import replace

from snapscale.freezer.decide import Action, before_claim
from snapscale.shared.bus import CheckpointEvent, FreezeCommand, FreezeRefusal, next_refusal, read_refusals
from snapscale.shared.bus.refusals import encode_refusal, refusal_key
from snapscale.shared.engine import refusal
from snapscale.shared.engine.errors import CriuError, CudaError, HookError

FAILED = CheckpointEvent(
    deployment="d", host="h1", ok=False, ts=100.0, command_id="c1", compat_hash="k1",
    reason="criu_dump: criu dump exited 1", refusal="tcp-connection",
)  # fmt: skip


def test_the_named_reason_is_what_criu_refused_else_the_step() -> None:
    tail = "Error (criu/sk-unix.c:874): External socket is used. Consider using --ext-unix-sk option."
    assert refusal(CriuError("criu_dump", "criu dump exited 1", tail)) == "external-unix-socket"
    tcp = "Error (criu/sk-inet.c:200): Connected TCP socket, consider using --tcp-established option."
    assert refusal(CriuError("criu_dump", "criu dump exited 1", tcp)) == "tcp-connection"
    assert refusal(CriuError("criu_dump", "criu dump exited 1", "Error: something new")) == "criu-dump"
    assert refusal(HookError("before_freeze", "timed out after 10 s")) == "before-freeze"
    assert refusal(CudaError("cuda_checkpoint", "CUDA_ERROR_NOT_SUPPORTED")) == "cuda-checkpoint"


def test_a_refusal_is_recorded_counted_once_per_command_and_cleared_by_a_checkpoint() -> None:
    r = next_refusal(None, FAILED)
    assert r == FreezeRefusal("d", "k1", "tcp-connection", FAILED.reason, 100.0, 100.0, 1, "h1", "c1")
    assert r.line() == "cannot be frozen: tcp-connection"
    assert next_refusal(r, replace(FAILED, ts=150.0)) is r  # the same command's event again
    again = next_refusal(r, replace(FAILED, ts=200.0, command_id="c2", refusal="external-unix-socket"))
    assert again is not None and (again.since, again.last, again.failures) == (100.0, 200.0, 2)
    assert again.refusal == "external-unix-socket"
    ok = replace(FAILED, ok=True, checkpoint_id="ck1", refusal="", reason="")
    assert next_refusal(again, ok) is None
    assert next_refusal(again, replace(ok, skipped=True)) is again  # a skip made nothing
    not_the_workloads = replace(FAILED, refusal="", compat_hash="", reason="no sandbox for replica r1")
    assert next_refusal(None, not_the_workloads) is None


def test_records_are_read_from_the_leases_bucket_beside_other_keys() -> None:
    r = next_refusal(None, FAILED)
    assert r is not None
    values = [
        ("scaler.leader", b"{}"),
        (refusal_key("d", "k1"), encode_refusal(r)),
        (refusal_key("d", "k2"), b"?"),
    ]
    assert read_refusals(values) == [r]


def test_an_auto_freeze_of_a_refused_key_is_skipped_and_a_forced_one_goes() -> None:
    r = next_refusal(None, FAILED)
    auto = FreezeCommand(id="c3", deployment="d", replica="r1", issued_at=300.0)
    d = before_claim(auto, done=False, catalog=None, refused=r)
    assert d is not None and d.action is Action.SKIP
    assert d.reason.startswith("cannot be frozen: tcp-connection (since 1970-01-01 00:01:40 UTC, 1 failed)")
    forced = before_claim(replace(auto, force=True), done=False, catalog=None, refused=r)
    assert forced is not None and forced.action is Action.FREEZE
    assert before_claim(auto, done=False, catalog=None, refused=None) is None
