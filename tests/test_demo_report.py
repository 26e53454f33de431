"""`snapscale demo`'s bookkeeping: replica and checkpoint events folded into scale-ups, the table,
the cold/restore ratio and the JSON. Pure, so tables of events and no servers."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import orjson
import pytest

from snapscale import demo
from snapscale.demo.live import Console
from snapscale.demo.report import (
    DemoState,
    ScaleUp,
    cleanup_lines,
    cold_restore_ratio,
    summary,
    table,
    to_plain,
)
from snapscale.shared.bus.messages import CheckpointEvent, ReplicaEvent, ReplicaState, Tier
from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.core.settings import Settings

S = ReplicaState
DEP = "sample"


def ev(replica: str, state: ReplicaState, ts: float, tier: Tier | None = None, **kw: Any) -> ReplicaEvent:
    return ReplicaEvent(
        deployment=DEP, replica=replica, host="demo-host", state=state, ts=ts, tier=tier, **kw
    )


def played() -> DemoState:
    st = DemoState(deployment=DEP)
    st.begin_step("cold", 100.0)
    st.apply_replica(ev("r1", S.STARTING, 100.2, Tier.COLD, reason="no checkpoint for this host's key"))
    done = st.apply_replica(
        ev(
            "r1",
            S.READY,
            112.0,
            Tier.COLD,
            timings_s={"launch": 0.3, "ready_probe": 11.4},
            endpoint="10.213.0.2:8000",
        )
    )
    assert done is not None and done.time_to_ready_s == pytest.approx(12.0)
    st.apply_checkpoint(
        CheckpointEvent(deployment=DEP, host="demo-host", ok=True, ts=115.0, checkpoint_id="c1",
                        sizes={"total": 90_000_000, "new": 30_000_000}, timings_s={"criu_dump": 0.4})
    )  # fmt: skip
    st.apply_checkpoint(
        CheckpointEvent(deployment=DEP, host="demo-host", ok=True, ts=116.0, checkpoint_id="c1", skipped=True)
    )
    st.begin_step("quiet", 120.0)
    st.apply_replica(ev("r1", S.RELEASING, 127.0))
    st.apply_replica(ev("r1", S.STOPPED, 127.5))
    st.begin_step("restore", 130.0)
    st.apply_replica(ev("r2", S.RESTORING, 130.1, Tier.CACHE))
    phases = {"lookup": 0.01, "prefetch": 0.02, "materialize": 0.1, "criu_restore": 0.6, "ready": 0.2}
    st.apply_replica(ev("r2", S.READY, 131.5, Tier.CACHE, checkpoint_id="c1", timings_s=phases))
    return st


def test_scale_ups_follow_the_steps_that_caused_them() -> None:
    st = played()
    assert [(s.step, s.replica, s.tier) for s in st.scale_ups] == [
        ("cold", "r1", Tier.COLD),
        ("restore", "r2", Tier.CACHE),
    ]
    cold, restore = st.scale_ups
    assert cold.states == ["starting", "ready"]
    assert cold.reason == "no checkpoint for this host's key"
    assert restore.time_to_ready_s == pytest.approx(1.5)
    assert restore.checkpoint_id == "c1"
    assert st.live() == ["r2"] and st.ready() == ["r2"]
    assert st.frozen() is not None and st.frozen().checkpoint_id == "c1"  # type: ignore[union-attr]
    assert cold_restore_ratio(st.scale_ups) == pytest.approx(8.0)


def test_releases_and_other_deployments_start_no_scale_up() -> None:
    st = DemoState(deployment=DEP)
    st.begin_step("x", 0.0)
    assert st.apply_replica(ev("r1", S.RELEASING, 1.0)) is None
    other = ReplicaEvent(deployment="other", replica="r9", host="h", state=S.STARTING, ts=1.0, tier=Tier.COLD)
    assert st.apply_replica(other) is None
    assert st.scale_ups == []
    # A restore that falls back to a cold boot is one scale-up, ending cold with the reason.
    st.apply_replica(ev("r2", S.RESTORING, 2.0, Tier.STORE))
    st.apply_replica(ev("r2", S.STARTING, 3.0, Tier.COLD, reason="criu restore failed"))
    st.apply_replica(ev("r2", S.READY, 9.0, Tier.COLD))
    assert len(st.scale_ups) == 1
    assert st.scale_ups[0].tier is Tier.COLD and st.scale_ups[0].reason == "criu restore failed"
    assert st.scale_ups[0].states == ["restoring", "starting", "ready"]


def test_a_failed_replica_is_reported_not_ready() -> None:
    st = DemoState(deployment=DEP)
    st.begin_step("cold", 0.0)
    st.apply_replica(ev("r1", S.STARTING, 1.0, Tier.COLD))
    assert st.apply_replica(ev("r1", S.FAILED, 5.0, reason="ready probe timed out")) is None
    assert st.scale_ups[0].failed == "ready probe timed out"
    assert st.ready_in_step("cold") == []
    assert "ready probe timed out" in table(st.scale_ups)
    assert cold_restore_ratio(st.scale_ups) is None


def test_table_and_summary_show_tiers_times_phases_and_ratio() -> None:
    st = played()
    restore = st.scale_ups[1]
    restore.first_request_at, restore.first_answer_at = 130.01, 131.57  # through the gateway
    text = summary(st)
    lines = text.splitlines()
    head = ["#", "scale-up", "replica", "tier", "to", "ready", "first", "answer", "phases"]
    assert lines[0].split() == head
    assert "cold" in lines[2] and "12.00s" in lines[2] and "ready_probe 11.40s" in lines[2]
    assert lines[2].split()[5] == "-"  # no answer was asked for
    assert "cache" in lines[3] and "1.50s" in lines[3] and "criu_restore 0.60s" in lines[3]
    assert lines[3].split()[4:6] == ["1.50s", "1.56s"]  # ready, and the first answer beside it
    assert to_plain(st)["scale_ups"][1]["time_to_first_answer_s"] == pytest.approx(1.56)
    assert "checkpoint c1: total 90.0 MB, new 30.0 MB" in text
    assert "cold boot / restore: 8.0x" in text


def test_json_has_the_same_results() -> None:
    data = orjson.loads(orjson.dumps(to_plain(played(), work_dir="/tmp/x")))
    assert data["cold_restore_ratio"] == pytest.approx(8.0)
    assert [s["tier"] for s in data["scale_ups"]] == ["cold", "cache"]
    assert data["scale_ups"][1]["time_to_ready_s"] == pytest.approx(1.5)
    assert data["checkpoint"]["checkpoint_id"] == "c1"
    assert data["work_dir"] == "/tmp/x"


def test_ratios_use_the_fastest_of_each_and_keep_resume_apart() -> None:
    ups = [
        ScaleUp("a", "r1", 0.0, Tier.COLD, 30.0),
        ScaleUp("a", "r5", 0.0, Tier.COLD, 40.0),
        ScaleUp("b", "r2", 0.0, Tier.STORE, 3.0),
        ScaleUp("b", "r6", 0.0, Tier.CACHE, 2.0),
        ScaleUp("c", "r3", 0.0, Tier.RESUME, 1.0),
        ScaleUp("d", "r4", 0.0, None),
    ]
    assert cold_restore_ratio(ups) == pytest.approx(15.0)
    assert cold_restore_ratio(ups, (Tier.RESUME,)) == pytest.approx(30.0)
    st = DemoState(deployment=DEP, scale_ups=ups)
    text = summary(st)
    assert "cold boot / restore: 15.0x" in text and "cold boot / resume: 30.0x" in text


def test_demo_env_points_services_at_its_own_servers(tmp_path: Path) -> None:
    env = demo.demo_env({"PATH": "/bin"}, tmp_path, "nats://127.0.0.1:4999", "demo-host")
    s = Settings.from_env(env)
    assert s.nats_url == "nats://127.0.0.1:4999"
    assert s.store.url == f"file://{tmp_path / 'store'}"
    assert s.signing_key and s.host_id == "demo-host"
    assert s.state_dir == tmp_path / "state" and s.cache_dir == tmp_path / "cache"
    s3 = demo.demo_env(
        {"SNAPSCALE_STORE": "s3://b/p", "SNAPSCALE_SIGNING_KEY": "k"}, tmp_path, "nats://x:1", "h"
    )
    assert s3["SNAPSCALE_STORE"] == "s3://b/p" and s3["SNAPSCALE_SIGNING_KEY"] == "k"


def test_demo_spec_is_one_replica_short_windows_and_auto_freeze() -> None:
    d = DeploymentSpec(name=DEP, command=["python", "-m", "x"])
    opts = demo.DemoOptions(grace_s=5.0)
    t = demo.demo_spec(d, opts)
    assert t.scaling.max_replicas == 1 and t.scaling.min_replicas == 0
    assert t.scaling.scale_to_zero_after_s == 5.0
    assert t.freeze.after_ready and t.freeze.keep_running
    assert t.spec_hash() == d.spec_hash(), "tuning the demo must not change the checkpoint's key"
    assert demo.demo_spec(d, opts, release_mode="suspend").scaling.release_mode == "suspend"


def test_cli_registers_demo() -> None:
    from snapscale.cli import build_parser

    args = build_parser().parse_args(["demo", "--json", "out.json", "--resume", "--grace-s", "3"])
    assert isinstance(args, argparse.Namespace)
    assert args.func is demo._run and args.json_path == Path("out.json") and args.resume and args.grace_s == 3


def test_heartbeats_say_what_a_host_has_cached() -> None:
    from snapscale.shared.bus.messages import HostHeartbeat

    st = DemoState(deployment=DEP)
    assert not st.cached_on("demo-host", "c1")
    st.apply_host(HostHeartbeat(host="demo-host", ts=1.0, compat_hash="k", cached_checkpoints=[]))
    assert not st.cached_on("demo-host", "c1")
    st.apply_host(HostHeartbeat(host="demo-host", ts=2.0, compat_hash="k", cached_checkpoints=["c1"]))
    assert st.cached_on("demo-host", "c1") and not st.cached_on("other", "c1")


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_console_prints_state_changes_only_off_a_terminal() -> None:
    s = _Stream(tty=False)
    c = Console(s)
    c.status("[   0.1s] cold: r1=starting")
    c.status("[   0.2s] cold: r1=starting")  # only the clock moved
    c.status("[   2.0s] cold: r1=ready")
    c.say("done")
    assert s.getvalue().splitlines() == ["[   0.1s] cold: r1=starting", "[   2.0s] cold: r1=ready", "done"]


def test_console_rewrites_one_line_on_a_terminal() -> None:
    s = _Stream(tty=True)
    c = Console(s)
    c.status("[   0.1s] cold: r1=starting")
    c.status("[   0.2s] cold: r1=starting")
    assert "\n" not in s.getvalue() and s.getvalue().count("\r") == 2
    c.say("ready")
    # The live line is wiped before a message, which then stands on its own line.
    assert s.getvalue().endswith("\rready\n")


def test_the_cleanup_says_what_it_stopped_and_that_nothing_is_left() -> None:
    lines = cleanup_lines(["sample-cpu-8259f40e7f"], 1, ["snapscale-6545"], [])
    assert lines == [
        "stopped replica sample-cpu-8259f40e7f, still serving at the end (1 process), "
        "and deleted its network namespace snapscale-6545",
        "nothing the demo started is left running",
    ]
    assert cleanup_lines([], 0, [], []) == ["nothing the demo started is left running"]
    assert cleanup_lines([], 2, [], [4242])[-1] == "still running from the demo's work dir: PIDs 4242"
