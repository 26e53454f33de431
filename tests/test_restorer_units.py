"""The restorer's bookkeeping: GPU/CPU-slot reservations, the suspend budget, the command ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapscale.restorer.budget import Suspended, over_budget
from snapscale.restorer.ledger import Entry, Ledger
from snapscale.restorer.slots import Grant, NoCapacityError, Slots
from snapscale.shared.bus.messages import GpuInfo
from snapscale.shared.store.backend import RetryableStoreError

GPUS = [GpuInfo(i, f"GPU-{i}", "H100", 80 << 30) for i in range(3)]


def test_gpu_reservations_up_to_free_gpus() -> None:
    s = Slots(list(GPUS), cpu_slots=0)
    assert s.reserve("a", 2).gpu_uuids == ("GPU-0", "GPU-1")
    assert s.reserve("a", 2).gpu_uuids == ("GPU-0", "GPU-1")  # same replica: same grant
    with pytest.raises(NoCapacityError, match="needs 2 GPUs, 1 of 3 free"):
        s.reserve("b", 2)
    assert s.reserve("b", 1).gpu_uuids == ("GPU-2",)
    assert [g.free for g in s.gpu_view()] == [False, False, False]
    s.free("a")
    assert s.free_gpus() == ["GPU-0", "GPU-1"]


def test_wanted_gpus_must_be_free_and_known() -> None:
    s = Slots(list(GPUS), cpu_slots=0)
    assert s.reserve("a", 1, ["GPU-2"]).gpu_uuids == ("GPU-2",)
    with pytest.raises(NoCapacityError, match=r"in use: \['GPU-2'\]"):
        s.reserve("b", 1, ["GPU-2"])
    with pytest.raises(NoCapacityError, match=r"unknown: \['GPU-9'\]"):
        s.reserve("b", 1, ["GPU-9"])
    with pytest.raises(NoCapacityError, match="names 2 GPUs, the spec needs 1"):
        s.reserve("b", 1, ["GPU-0", "GPU-1"])


def test_cpu_slots() -> None:
    s = Slots([], cpu_slots=2)
    assert s.reserve("a", 0) == Grant("a", (), cpu_slot=True)
    s.reserve("b", 0)
    with pytest.raises(NoCapacityError, match="no free CPU slot"):
        s.reserve("c", 0)
    s.rename("b", "c")
    assert set(s.held) == {"a", "c"}
    s.free("a")
    assert s.free_cpu_slots() == 1
    with pytest.raises(NoCapacityError, match="needs 1 GPUs, 0 of 0 free"):
        s.reserve("g", 1)


@pytest.mark.parametrize(
    ("items", "budget", "stop"),
    [
        ([], 0, []),
        ([Suspended("a", 1, 10)], 10, []),
        ([Suspended("a", 1, 10)], 9, ["a"]),
        ([Suspended("new", 5, 10), Suspended("old", 1, 10), Suspended("mid", 3, 10)], 15, ["old", "mid"]),
        ([Suspended("new", 5, 10), Suspended("old", 1, 10), Suspended("mid", 3, 10)], 20, ["old"]),
    ],
)
def test_over_budget_stops_oldest_first(items: list[Suspended], budget: int, stop: list[str]) -> None:
    assert over_budget(items, budget) == stop


def test_ledger_survives_reopen_and_lists_unfinished(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l")
    led.start(Entry("c1", "scale-up", "d", "r1", 100.0, run_dir="/x"))
    led.start(Entry("c2", "scale-up", "d", "r2", 100.0))
    led.finish("c2", ok=True, outcome="ready")
    again = Ledger(tmp_path / "l")
    got = again.get("c1")
    assert got is not None and got.run_dir == "/x" and not got.done
    assert [e.id for e in again.unfinished()] == ["c1"]
    assert again.finish("nope", ok=True, outcome="") is None
    done = again.get("c2")
    assert done is not None and done.done and done.ok and done.outcome == "ready"
    assert again.prune(older_than=200.0) == 1
    assert again.get("c2") is None and again.get("c1") is not None
    assert all(p.parent == tmp_path / "l" for p in (tmp_path / "l").iterdir())


def test_an_entry_whose_ids_break_their_limits_is_quarantined_not_replayed(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    led.start(Entry("c/../1", "scale-up", "d", "r1", 1.0))  # written by hand: no command has such an id
    led.start(Entry("c2", "scale-up", "a.b", "r2", 1.0))
    led.start(Entry("c3", "scale-up", "d", "r3", 1.0))
    assert all(p.parent == tmp_path for p in tmp_path.glob("*.json")), "an id never picks a path"
    assert [e.id for e in led.unfinished()] == ["c3"]
    assert len(list((tmp_path / "quarantine").glob("*.json"))) == 2
    assert len(list(tmp_path.glob("*.json"))) == 1  # moved aside: not read again at the next start
    led.quarantine("c3", "cannot be replayed")
    assert led.unfinished() == [] and len(list((tmp_path / "quarantine").glob("*.json"))) == 3


def test_ledger_unreadable_entry_is_treated_as_new(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    led.start(Entry("c1", "scale-up", "d", "r1", 1.0))
    for p in tmp_path.glob("*.json"):
        p.write_bytes(b"{not json")
    assert led.get("c1") is None
    assert led.unfinished() == []
    assert [p.name for p in (tmp_path / "quarantine").iterdir()] == [f"{_digest('c1')}.json"]
    led.start(Entry("c1", "scale-up", "d", "r1", 1.0))  # the command again: a fresh start
    assert led.get("c1") is not None


def _digest(command_id: str) -> str:
    import hashlib

    return hashlib.sha256(command_id.encode()).hexdigest()[:40]


def test_heartbeat_counts_complete_checkpoints_and_suspended_memory() -> None:
    from snapscale.restorer.inventory import heartbeat
    from snapscale.shared.bus.messages import ReplicaState, ReplicaSummary

    hb = heartbeat(
        host="h",
        now=5.0,
        compat_hash="c",
        compat={"gpu_model": "cpu"},
        gpus=GPUS[:1],
        cpu_slots=2,
        cached={"full": (10, 10), "part": (3, 10), "empty": (0, 0)},
        replicas=[
            ReplicaSummary("d", "a", ReplicaState.SUSPENDED, rss_bytes=100),
            ReplicaSummary("d", "b", ReplicaState.READY, rss_bytes=0),
            ReplicaSummary("d", "c", ReplicaState.SUSPENDED, rss_bytes=50),
        ],
        suspend_budget_bytes=1000,
        interval_s=1.0,
        compat_hashes={"d": "k"},
    )
    assert hb.cached_checkpoints == ["empty", "full"]
    assert hb.cached_bytes == {"full": 10, "part": 3, "empty": 0}
    assert hb.suspend_used_bytes == 150 and hb.compat_hashes == {"d": "k"}


def test_status_table() -> None:
    from snapscale.restorer.status import Status, render
    from snapscale.shared.bus.catalog import CatalogEntry
    from snapscale.shared.bus.messages import HostHeartbeat, ReplicaEvent, ReplicaState, Tier

    st = Status(
        hosts=[
            HostHeartbeat(
                "h1",
                90.0,
                "c" * 64,
                gpus=GPUS[:2],
                cached_checkpoints=["ck1"],
                cached_bytes={"ck1": 2_000_000, "ck0": 1},
            )
        ],
        replicas=[
            ReplicaEvent("d", "r1", "h1", ReplicaState.READY, 40.0, tier=Tier.COLD, reason="no checkpoint")
        ],
        checkpoints=[
            CatalogEntry("d", "c" * 64, "ck1", "manifests/d/ck1.json", 0.0, sizes={"total": 5_000_000})
        ],
        unreadable=["replicas/x.y"],
    )
    text = render(st, now=100.0)
    lines = text.splitlines()
    assert lines[0] == "HOSTS"
    assert lines[2].split() == ["h1", "10s", "2/2", "0", "0", "0B/0B", "ck1", "c" * 12]
    assert "r1" in text and "cold" in text and "no checkpoint" in text and "60s" in text
    assert [ln.split() for ln in lines[-4:-2]] == [
        ["h1", "ck0", "1B", "partial"],
        ["h1", "ck1", "1.9MiB", "complete"],
    ]
    assert text.endswith("unreadable KV entries: replicas/x.y")


@pytest.mark.parametrize(
    ("exc", "reads"),
    [
        (TimeoutError(), "timed out"),
        (TimeoutError("deadline of 2s exceeded"), "timed out (deadline of 2s exceeded)"),
        (ValueError("bad"), "ValueError: bad"),
        (RuntimeError(), "RuntimeError"),
        (
            RetryableStoreError("S3 get chunks/ab: still failing after 8 tries: connection refused"),
            "store unreachable: S3 get chunks/ab: still failing after 8 tries: connection refused",
        ),
    ],
)
def test_describe(exc: BaseException, reads: str) -> None:
    from snapscale.restorer.errors import describe
    from snapscale.shared.engine.errors import CriuError

    assert describe(exc) == reads
    tail = (
        "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "Error (criu/protobuf.c:93): Read 1497 bytes while 3007 expected from core-1.img\n"
        "Error (criu/cr-restore.c:2331): Restoring FAILED.\n"
    )
    assert describe(CriuError("criu_restore", "exited 1", tail)) == (
        "criu_restore: exited 1: Error (criu/protobuf.c:93): "
        "Read 1497 bytes while 3007 expected from core-1.img"
    )
    assert (
        describe(CriuError("x", "y", "Error (c): Restoring FAILED.")) == "x: y: Error (c): Restoring FAILED."
    )
    assert describe(CriuError("criu_restore", "exited 1")) == "criu_restore: exited 1"


def test_store_problems_read_as_reasons() -> None:
    from snapscale.restorer.lookup import store_problem
    from snapscale.shared.store.backend import NotFoundError, RetryableStoreError
    from snapscale.shared.store.manifest import SignatureError

    assert (
        store_problem(SignatureError("signature does not match"))
        == "manifest refused: signature does not match"
    )
    assert (
        store_problem(NotFoundError("manifests/d/x.json"))
        == "manifest missing from the store (manifests/d/x.json)"
    )
    assert store_problem(RetryableStoreError("S3 get x: still failing")).startswith("store unreachable: ")


def test_a_heartbeat_interval_the_scaler_would_refuse_is_refused_at_start() -> None:
    from snapscale.restorer.config import RestorerConfig
    from snapscale.shared.core.errors import ConfigError

    assert RestorerConfig(host="h", heartbeat_s=0.5).heartbeat_s == 0.5
    for bad in (0.001, 7200.0):
        with pytest.raises(ConfigError, match=r"heartbeat_s must be within \[0.01, 3600\]"):
            RestorerConfig(host="h", heartbeat_s=bad)


def test_the_death_watch_takes_only_ready_or_suspended_replicas_that_died() -> None:
    """A replica being started or stopped (a release kills its tree first) is not the watch's:
    reporting it failed would race the release's own `stopped`."""
    from snapscale.restorer.deaths import dead, death_reason
    from snapscale.restorer.replicas import Live
    from snapscale.shared.bus.messages import ReplicaState
    from snapscale.shared.bus.spec import DeploymentSpec
    from snapscale.shared.engine import Sandbox

    spec = DeploymentSpec(name="d", command=["true"])
    lives = {
        f"{state.value}-{alive}": Live(
            spec, Sandbox(f"{state.value}-{alive}", "d", 1, "ns", ""), state, None, 0.0
        )
        for state in ReplicaState
        for alive in (True, False)
    }
    found = dead(lives.values(), lambda sb: sb.replica.endswith("True"))
    assert sorted(lv.sandbox.replica for lv in found) == ["ready-False", "suspended-False"]
    assert death_reason(ReplicaState.READY, "out of memory: limit 64 MiB") == (
        "the sandbox died while ready: out of memory: limit 64 MiB"
    )
    said = death_reason(ReplicaState.SUSPENDED, None)
    assert said == "the sandbox died while suspended: its process exited"
