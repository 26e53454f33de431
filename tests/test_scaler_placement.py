"""Placement and release choices as tables over host heartbeats; plus the replica record rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from snapscale.scaler.placement import (
    Reservations,
    choose_releases,
    needs_freeze,
    place,
    prefetch_targets,
)
from snapscale.scaler.records import apply_event
from snapscale.shared.bus.messages import (
    GpuInfo,
    HostHeartbeat,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
    ReplicaSummary,
)
from snapscale.shared.bus.spec import DeploymentSpec, ScalingSpec

GPU1 = DeploymentSpec(name="llm", command=["serve"], gpus=1, gpu_model="H100")
GPU2 = replace(GPU1, gpus=2)
CPU = DeploymentSpec(name="llm", command=["serve"], gpus=0)


def host(
    name: str,
    *,
    free: int = 2,
    busy: int = 0,
    model: str = "H100",
    key: str = "k1",
    cached: list[str] | None = None,
    partial: dict[str, int] | None = None,
    replicas: list[ReplicaSummary] | None = None,
    cpu_slots: int = 0,
    budget: int = 0,
    used: int = 0,
    keys: dict[str, str] | None = None,
) -> HostHeartbeat:
    gpus = [GpuInfo(i, f"{name}-g{i}", model, 80 << 30, free=i >= busy) for i in range(busy + free)]
    return HostHeartbeat(
        host=name,
        ts=0.0,
        compat_hash=key,
        gpus=gpus,
        cached_checkpoints=cached or [],
        cached_bytes={**(partial or {}), **{c: 1 << 30 for c in cached or []}},
        replicas=replicas or [],
        cpu_slots=cpu_slots,
        suspend_budget_bytes=budget,
        suspend_used_bytes=used,
        compat_hashes=keys or {},
    )


def fleet(*hbs: HostHeartbeat) -> dict[str, HostHeartbeat]:
    return {h.host: h for h in hbs}


SUSPENDED_ON_C = ReplicaSummary("llm", "llm-old", ReplicaState.SUSPENDED, rss_bytes=1 << 30)


@pytest.mark.parametrize(
    ("name", "spec", "hosts", "n", "want"),
    [
        ("any host with room", GPU1, fleet(host("a", free=0), host("b")), 1, [("b", "any")]),
        (
            "suspended replica first",
            GPU1,
            fleet(host("a", cached=["ck1"]), host("c", replicas=[SUSPENDED_ON_C])),
            1,
            [("c", "resume")],
        ),
        (
            "full cache beats partial beats none",
            GPU1,
            fleet(
                host("a", free=1), host("b", free=1, partial={"ck1": 10}), host("c", free=1, cached=["ck1"])
            ),
            3,
            [("c", "cached"), ("b", "partial"), ("a", "any")],
        ),
        (
            "more partial bytes first",
            GPU1,
            fleet(host("a", partial={"ck1": 5}), host("b", partial={"ck1": 50})),
            1,
            [("b", "partial")],
        ),
        (
            "cache of another key does not count",
            GPU1,
            fleet(host("a", key="k2", cached=["ck1"]), host("b", partial={"ck1": 1})),
            1,
            [("b", "partial")],
        ),
        (
            "spread within a tier",
            GPU1,
            fleet(host("a", free=4), host("b", free=4)),
            4,
            [("a", "any"), ("b", "any"), ("a", "any"), ("b", "any")],
        ),
        ("wrong GPU model never", GPU1, fleet(host("a", model="A100")), 1, []),
        ("needs two GPUs on one host", GPU2, fleet(host("a", free=1), host("b", free=2)), 2, [("b", "any")]),
        (
            "CPU deployment uses free cpu slots",
            CPU,
            fleet(host("a", free=0, cpu_slots=0), host("b", free=0, cpu_slots=2)),
            3,
            [("b", "any"), ("b", "any")],
        ),
        (
            "the deployment's own key picks the checkpoint",
            GPU1,
            fleet(host("a", key="host-only", keys={"llm": "k1"}, cached=["ck1"]), host("b", key="k1")),
            1,
            [("a", "cached")],
        ),
    ],
)
def test_place_table(
    name: str, spec: DeploymentSpec, hosts: dict[str, HostHeartbeat], n: int, want: list[tuple[str, str]]
) -> None:
    got = place(spec, n, hosts, {"k1": "ck1"}, {}, Reservations())
    assert [(p.host, p.why) for p in got] == want, name


def test_cpu_slots_promised_in_flight_are_not_offered_again() -> None:
    hosts = fleet(host("a", free=0, cpu_slots=2))
    reserved = Reservations()
    for p in place(CPU, 5, hosts, {}, {}, reserved):
        reserved.take(p)
    assert place(CPU, 1, hosts, {}, {}, reserved) == []
    reserved.give_back("a", [], "r")
    assert len(place(CPU, 1, hosts, {}, {}, reserved)) == 1


def test_never_double_books_gpus_across_batches_and_in_flight() -> None:
    hosts = fleet(host("a", free=3), host("b", free=1))
    reserved = Reservations()
    first = place(GPU1, 2, hosts, {}, {}, reserved)
    for p in first:
        reserved.take(p)
    # the heartbeats have not caught up: the same GPUs still read free
    second = place(GPU1, 5, hosts, {}, {}, reserved)
    for p in second:
        reserved.take(p)
    uuids = [u for p in first + second for u in p.gpu_uuids]
    assert len(uuids) == len(set(uuids)) == 4
    assert place(GPU1, 1, hosts, {}, {}, reserved) == []
    # a command that ended gives its GPU back
    reserved.give_back(first[0].host, first[0].gpu_uuids, "r")
    assert [p.gpu_uuids for p in place(GPU1, 1, hosts, {}, {}, reserved)] == [first[0].gpu_uuids]


def test_a_gpu_listed_twice_is_handed_out_once() -> None:
    # a heartbeat may repeat a uuid: once placed, every listing of it is taken, not just the first
    hb = host("a", free=3)
    twice = replace(hb, gpus=[*hb.gpus, replace(hb.gpus[0], index=5)])
    got = place(GPU1, 4, {"a": twice}, {}, {}, Reservations())
    assert [p.gpu_uuids for p in got] == [["a-g0"], ["a-g1"], ["a-g2"]]


def test_a_resumed_replica_leaves_every_host_listing_it() -> None:
    # two hosts report the same suspended replica (one of them stale): it is resumed once
    hosts = fleet(host("a", replicas=[SUSPENDED_ON_C]), host("c", replicas=[SUSPENDED_ON_C]))
    got = place(GPU1, 3, hosts, {}, {}, Reservations())
    assert [(p.why, p.resume) for p in got] == [("resume", "llm-old"), ("any", None), ("any", None)]


def test_resume_is_not_offered_twice() -> None:
    hosts = fleet(host("c", free=2, replicas=[SUSPENDED_ON_C]))
    got = place(GPU1, 2, hosts, {}, {}, Reservations())
    assert [(p.why, p.resume) for p in got] == [("resume", "llm-old"), ("any", None)]


def test_avoid_and_existing_spread() -> None:
    hosts = fleet(host("a"), host("b"), host("c"))
    got = place(GPU1, 1, hosts, {}, {"a": 1, "b": 0}, Reservations(), avoid=frozenset({"b"}))
    assert [p.host for p in got] == ["c"]


def ready(replica: str, h: str, ts: float) -> ReplicaEvent:
    return ReplicaEvent("llm", replica, h, ReplicaState.READY, ts)


@pytest.mark.parametrize(
    ("name", "mode", "hosts", "want", "why"),
    [
        ("stop when asked", "stop", fleet(host("a", budget=10 << 30)), ReleaseMode.STOP, "release_mode=stop"),
        (
            "suspend with budget",
            "auto",
            fleet(host("a", budget=10 << 30)),
            ReleaseMode.SUSPEND,
            f"suspend budget left {10 << 30} B >= rss 0 B",
        ),
        (
            "stop without budget",
            "auto",
            fleet(host("a", budget=0)),
            ReleaseMode.STOP,
            "suspend budget left 0 B < rss 0 B",
        ),
        (
            "stop when budget is used",
            "suspend",
            fleet(host("a", budget=4, used=4)),
            ReleaseMode.STOP,
            "suspend budget left 0 B < rss 0 B",
        ),
        ("stop on an unknown host", "auto", {}, ReleaseMode.STOP, "host not reporting"),
    ],
)
def test_release_mode_table(
    name: str, mode: str, hosts: dict[str, HostHeartbeat], want: ReleaseMode, why: str
) -> None:
    spec = replace(GPU1, scaling=ScalingSpec(release_mode=mode))  # type: ignore[arg-type]
    got = choose_releases(spec, 1, [ready("r1", "a", 1.0)], hosts, Reservations())
    assert [(r.mode, r.why) for r in got] == [(want, why)], name  # `why` is formatted when read


def test_release_order_keeps_spread_then_newest() -> None:
    rs = [ready("r1", "a", 1.0), ready("r2", "a", 5.0), ready("r3", "b", 9.0), ready("r4", "a", 3.0)]
    got = choose_releases(GPU1, 2, rs, fleet(host("a"), host("b")), Reservations())
    assert [r.replica for r in got] == ["r2", "r4"]


def test_one_release_is_the_first_of_the_order() -> None:
    rs = [ready("r3", "b", 9.0), ready("r5", "a", 5.0), ready("r2", "a", 5.0), ready("r1", "a", 1.0)]
    hosts = fleet(host("a"), host("b"))

    def order(n: int, rs: list[ReplicaEvent] = rs) -> list[str]:
        return [r.replica for r in choose_releases(GPU1, n, rs, hosts, Reservations())]

    assert order(4) == ["r2", "r5", "r1", "r3"] and order(1) == ["r2"]
    # one of two: the newest, then by id, on one host or two
    assert order(1, rs[:2]) == ["r3"] and order(1, rs[1:3]) == ["r2"] and order(1, rs[2:0:-1]) == ["r2"]


def test_suspends_leave_the_callers_reservations_alone() -> None:
    rss = [ReplicaSummary("llm", f"r{i}", ReplicaState.READY, rss_bytes=1 << 30) for i in (1, 2)]
    reserved = Reservations(suspend_bytes={"a": 1})
    hosts = fleet(host("a", budget=8 << 30, replicas=rss))
    got = choose_releases(GPU1, 2, [ready("r1", "a", 1.0), ready("r2", "a", 2.0)], hosts, reserved)
    assert [r.mode for r in got] == [ReleaseMode.SUSPEND] * 2 and got[1].left == (7 << 30) - 1
    assert reserved.suspend_bytes == {"a": 1}


def test_suspend_budget_is_shared_within_a_batch() -> None:
    rss = [ReplicaSummary("llm", f"r{i}", ReplicaState.READY, rss_bytes=3 << 30) for i in (1, 2)]
    hosts = fleet(host("a", budget=4 << 30, replicas=rss))
    got = choose_releases(GPU1, 2, [ready("r1", "a", 1.0), ready("r2", "a", 2.0)], hosts, Reservations())
    assert sorted(r.mode for r in got) == [ReleaseMode.STOP, ReleaseMode.SUSPEND]


def test_freeze_and_prefetch_on_going_to_zero() -> None:
    hosts = fleet(host("a", key="k1"), host("b", key="k1", partial={"ck1": 9}), host("c", key="k2"))
    assert needs_freeze(hosts["c"], "llm", {"k1": "ck1"})
    assert not needs_freeze(hosts["a"], "llm", {"k1": "ck1"})
    assert not needs_freeze(None, "llm", {})
    per_deployment = host("d", key="host-only", keys={"llm": "k1", "other": "k9"})
    assert not needs_freeze(per_deployment, "llm", {"k1": "ck1"})
    assert needs_freeze(per_deployment, "other", {"k1": "ck1"})
    assert not needs_freeze(hosts["c"], "llm", {"k1": "ck1"}, {"k2": "cannot be frozen"})  # refused
    assert needs_freeze(hosts["c"], "llm", {"k1": "ck1"}, {"k1": "cannot be frozen"})  # another key's
    assert prefetch_targets(GPU1, hosts, {"k1": "ck1"}, Reservations()) == [("b", "ck1"), ("a", "ck1")]
    warm = fleet(host("a", cached=["ck1"]), host("b"), host("d"))
    assert prefetch_targets(GPU1, warm, {"k1": "ck1"}, Reservations()) == [("b", "ck1")]


@pytest.mark.parametrize(
    ("name", "old", "new", "want"),
    [
        ("pending to restoring", ReplicaState.PENDING, ReplicaState.RESTORING, ReplicaState.RESTORING),
        ("outcome only", ReplicaState.PENDING, ReplicaState.READY, ReplicaState.READY),
        ("stale", ReplicaState.READY, ReplicaState.RESTORING, None),
        ("repeated", ReplicaState.READY, ReplicaState.READY, None),
        ("release ends", ReplicaState.RELEASING, ReplicaState.SUSPENDED, ReplicaState.SUSPENDED),
        ("adopt a live unknown", None, ReplicaState.SUSPENDED, ReplicaState.SUSPENDED),
        ("ignore a dead unknown", None, ReplicaState.STOPPED, None),
    ],
)
def test_apply_event_table(
    name: str, old: ReplicaState | None, new: ReplicaState, want: ReplicaState | None
) -> None:
    cur = None if old is None else ReplicaEvent("llm", "r1", "a", old, 1.0, gpu_uuids=["g0"])
    got = apply_event(cur, ReplicaEvent("llm", "r1", "a", new, 2.0))
    assert (got.state if got else None) == want, name
    if got is not None and cur is not None:
        assert got.gpu_uuids == ["g0"]  # what the new event leaves out is kept
