"""The fleet simulator: hand-computed answers, determinism, the services' own functions, loaders."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from snapscale.freezer import claims as freezer_claims
from snapscale.freezer import job as freezer_job
from snapscale.restorer import scaleup as restorer_scaleup
from snapscale.restorer.tiers import Candidate, Observed, choose
from snapscale.scaler import actions as scaler_actions
from snapscale.scaler import service as scaler_service
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.placement import Reservations, choose_releases, needs_freeze, place, prefetch_targets
from snapscale.shared.bus import DeploymentSpec, ReplicaEvent, ReplicaState, ReplicaSummary, ScalingSpec, Tier
from snapscale.shared.core.errors import ConfigError
from snapscale.simulate import down, engine
from snapscale.simulate.engine import Sim
from snapscale.simulate.fleet import COMPAT, Fleet, ReleaseBeats, Suspended
from snapscale.simulate.policies import COLD_ONLY, POLICIES, Policy, Result
from snapscale.simulate.profile import GIB, Profile, load_profile
from snapscale.simulate.samples import samples
from snapscale.simulate.trace import GenSpec, Trace, generate, load_azure, load_csv

BY_NAME = {p.name: p for p in POLICIES}
# round numbers, no size dependence: a cold boot 20 s, a resume 2 s, a freeze 10 s
FLAT = Profile(cold_s=20.0, cold_s_per_gib=0.0, resume_s=2.0, resume_s_per_gib=0.0, freeze_s=10.0,
               freeze_s_per_gib=0.0)  # fmt: skip


def every_ten_minutes(n: int = 6) -> Trace:
    arr = np.array([5.0 + 600.0 * i for i in range(n)])
    return Trace(["llm"], [2.35], [arr], [np.full(n, 0.5)], 3600.0)


def simulate(trace: Trace, policy: Policy, profile: Profile = FLAT, *, checkpoints: bool = False) -> Result:
    """One host; `checkpoints` False: the fleet's first day, no deployment frozen yet."""
    per = [samples(trace, d) for d in range(len(trace.names))]
    # utilization 1: one held request asks for one replica (0.7 would start ceil(1 / 0.7) = 2)
    one = ScalingSpec(utilization=1.0)
    return Sim(
        trace, per, policy, profile, hosts=1, gpus_per_host=8, scaling=one, checkpoints=checkpoints
    ).run()


def test_one_request_every_ten_minutes_cold_only() -> None:
    """Each request finds no replica: activation starts one, a 20 s cold boot. The request's
    0.5 s sits in the stable window (60 s) until the tick at t0 + 61 drops it; the 30 s grace
    since its last traffic (t0 + 0.5) has passed by then, so the replica goes: 61 GPU-seconds."""
    r = simulate(every_ten_minutes(), BY_NAME["zero-cold"])
    assert list(r.waits) == [20.0] * 6
    assert r.gpu_s == pytest.approx(6 * 61.0)
    assert dict(r.restores) == {"cold": 6}
    assert r.freezes == 0 and r.timeouts == 0


def test_one_request_every_ten_minutes_with_tiers() -> None:
    """The first cold boot is auto-frozen (done 10 s after ready); the replica is suspended at
    release, so every later request resumes it in 2 s. GPU time is the same 61 s a cycle."""
    r = simulate(every_ten_minutes(), BY_NAME["tiers"])
    assert list(r.waits) == [20.0] + [2.0] * 5
    assert r.gpu_s == pytest.approx(6 * 61.0)
    assert dict(r.restores) == {"cold": 1, "resume": 5}
    assert r.freezes == 1


def test_with_yesterdays_checkpoint_the_first_request_restores_from_the_store() -> None:
    """store = hot 2.45 s + 2.35 GiB / 0.936 GiB/s (the defaults): no cold boot, no freeze."""
    r = simulate(every_ten_minutes(), BY_NAME["tiers"], checkpoints=True)
    assert list(r.waits) == pytest.approx([2.45 + 2.35 / 0.936] + [2.0] * 5)
    assert dict(r.restores) == {"store": 1, "resume": 5} and r.freezes == 0
    assert r.store_bytes == int(2.35 * GIB)


def test_keep_alive_holds_the_replica_until_the_grace_ends() -> None:
    """Keep-alive 10 min from the last traffic (t0 + 0.5): the next request (t0 + 600) comes
    first, so one cold boot serves all six, held to the grace's end after the last: 3005.5 + 600."""
    r = simulate(every_ten_minutes(), BY_NAME["keepalive-10m"])
    assert list(r.waits) == [20.0]
    assert r.gpu_s == pytest.approx(3600.0 - 5.0)  # the horizon ends first (3605.5 > 3600)


def test_the_same_seed_gives_the_same_day_and_another_seed_another() -> None:
    def once(seed: int) -> tuple[float, list[float], dict[str, int]]:
        tr = generate(GenSpec(deployments=40, requests=3000, horizon_s=3600.0, seed=seed))
        per = [samples(tr, d) for d in range(len(tr.names))]
        r = Sim(tr, per, BY_NAME["tiers-prefetch"], Profile(), hosts=2, gpus_per_host=8).run()
        return r.gpu_s, list(r.waits), dict(r.restores)

    a, b = once(7), once(7)
    assert a == b
    assert once(8) != a


def test_skipping_steady_decisions_changes_nothing() -> None:
    """A deployment is not decided on the ticks `steady_until` rules out: on a seeded trace on a
    crowded fleet, every policy's outcome equals deciding every deployment every tick."""

    def run(policy: Policy, tr: Trace, skip: bool) -> Result:
        per = [samples(tr, d) for d in range(len(tr.names))]
        cfg = ScalerConfig(tick_s=2.5)
        sim = Sim(tr, per, policy, Profile(), hosts=3, gpus_per_host=4, sampled=(0, 5), skip=skip, cfg=cfg)
        return sim.run()

    tr = generate(GenSpec(deployments=80, requests=6000, horizon_s=2 * 3600.0, seed=3))
    for policy in POLICIES:
        every, skipping = run(policy, tr, False), run(policy, tr, True)
        assert skipping.decisions < every.decisions * 0.8, policy.name
        skipping.decisions, skipping.events, skipping.wall_s = every.decisions, every.events, every.wall_s
        assert skipping == every, policy.name


def test_the_simulator_calls_the_services_functions() -> None:
    """The very function objects the services call, not copies."""
    used = {**vars(down), **vars(engine)}
    for module, names in (
        (scaler_service, ("decide", "activation")),
        (scaler_actions, ("place", "choose_releases", "needs_freeze", "prefetch_targets")),
        (restorer_scaleup, ("choose",)),
        (freezer_job, ("before_claim", "after_claim")),
        (freezer_claims, ("judge_claim",)),
    ):
        for name in names:
            assert used[name] is vars(module)[name], f"{name}: not the one {module.__name__} calls"


def test_a_run_goes_through_placement_and_the_tier_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {"place": 0, "choose": 0, "decide": 0}

    def spy(name: str, f):  # type: ignore[no-untyped-def]
        def wrapped(*a, **k):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return f(*a, **k)

        return wrapped

    for name in calls:
        monkeypatch.setattr(engine, name, spy(name, getattr(engine, name)))
    r = simulate(every_ten_minutes(2), BY_NAME["tiers"])
    assert calls["place"] == 2 and calls["choose"] == 2 and calls["decide"] == r.decisions > 0


def test_cold_only_policies_take_the_answer_choose_gives_whatever_the_host_holds() -> None:
    """The simulator asks `choose` nothing for a cold-only policy: its answer cannot vary."""
    for suspended in ((), ("r1",), ("r2", "r1")):
        for entry in (None, Candidate("ck", COMPAT), Candidate("ck", "other-key")):
            for cached in (0, GIB):
                o = Observed(
                    "r1",
                    COLD_ONLY,
                    COMPAT,
                    suspended=suspended,
                    entry=entry,
                    need_bytes=GIB,
                    cached_bytes=cached,
                )
                assert choose(o) == engine._COLD_BOOT
    assert engine._COLD_BOOT.tier is Tier.COLD and engine._COLD_BOOT.resume_replica is None


def test_candidates_choose_what_the_whole_fleet_would() -> None:
    """`place` and `prefetch_targets` over the few candidate hosts answer as over every host's heartbeat."""
    rnd = random.Random(3)
    spec = DeploymentSpec(name="d1", command=["x"], gpus=1)
    for _ in range(300):
        fleet = Fleet(12, 4, 8 * GIB, 2, 8 * GIB)
        for h in fleet.hosts:
            busy = rnd.randrange(0, 5)
            if busy:
                fleet.mark(h, [g.uuid for g in h.gpus[:busy]], True)
            if rnd.random() < 0.3:
                fleet.cache_put(h.name, "ck-d1", GIB)
            if rnd.random() < 0.2:
                fleet.suspend(h.name, f"r{h.name}", Suspended("d1", 0.0, GIB))
        ckpt = "ck-d1" if rnd.random() < 0.7 else None
        on = {h.name: 1 for h in rnd.sample(fleet.hosts, rnd.randrange(0, 3))}
        n = rnd.randrange(1, 6)
        catalog = {COMPAT: ckpt} if ckpt else {}
        everyone = {h.name: fleet.heartbeat(h.name, "d1", ckpt, 0.0) for h in fleet.hosts}
        few = {h: everyone[h] for h in fleet.candidates("d1", ckpt, on, n, 1)}
        assert place(spec, n, few, catalog, on, Reservations()) == place(
            spec, n, everyone, catalog, on, Reservations()
        )
        if ckpt is not None:
            want = rnd.randrange(1, 4)
            few = {h: everyone[h] for h in fleet.prefetch_candidates(ckpt, want, 1)}
            assert prefetch_targets(spec, few, catalog, Reservations(), want) == prefetch_targets(
                spec, everyone, catalog, Reservations(), want
            )


def test_a_release_reads_its_lighter_heartbeat_as_the_full_one() -> None:
    """`release_heartbeat` leaves out the GPUs, the cache and the suspended replicas:
    `choose_releases` and `needs_freeze` answer on it what they answer on the full heartbeat,
    over random fleets with other deployments' replicas, suspended ones and tight budgets."""
    rnd = random.Random(5)
    for _ in range(300):
        fleet = Fleet(6, 4, 8 * GIB, 2, rnd.choice([0, 2, 4]) * GIB)
        mode: Literal["auto", "stop", "suspend"] = rnd.choice(["auto", "stop", "suspend"])
        spec = DeploymentSpec(name="d1", command=["x"], gpus=1, scaling=ScalingSpec(release_mode=mode))
        ready: list[ReplicaEvent] = []
        for i, h in enumerate(fleet.hosts):
            if rnd.random() < 0.4:
                fleet.suspend(h.name, f"s{i}", Suspended(rnd.choice(["d1", "d2"]), 0.0, GIB))
            for j in range(rnd.randrange(0, 3)):
                dep, rep = rnd.choice(["d1", "d2"]), f"r{i}-{j}"
                nbytes = rnd.randrange(1, 3) * GIB
                fleet.set_ready(h.name, ReplicaSummary(dep, rep, ReplicaState.READY, [], 1.0, nbytes))
                if dep == "d1":
                    ready.append(ReplicaEvent(dep, rep, h.name, ReplicaState.READY, rnd.random()))
        ckpt = "ck-d1" if rnd.random() < 0.5 else None
        catalog = {COMPAT: ckpt} if ckpt else {}
        on = {e.host for e in ready}
        full = {h: fleet.heartbeat(h, "d1", ckpt, 2.0) for h in on}
        light = {h: fleet.release_heartbeat(h, "d1", 2.0) for h in on}
        n = rnd.randrange(0, len(ready) + 2)
        got = choose_releases(spec, n, ready, light, Reservations())
        assert got == choose_releases(spec, n, ready, full, Reservations())
        assert [r.why for r in got] == [r.why for r in choose_releases(spec, n, ready, full, Reservations())]
        for name in on:
            assert needs_freeze(light[name], "d1", catalog) == needs_freeze(full[name], "d1", catalog)
        # the scale-down's lazy map: the same answer, with only the released replicas' hosts built
        lazy = ReleaseBeats(fleet, "d1", 2.0)
        assert choose_releases(spec, n, ready, lazy, Reservations()) == got
        assert set(lazy.built) == {r.host for r in got}
        assert lazy["h0"] == fleet.release_heartbeat("h0", "d1", 2.0) and len(lazy) == len(fleet.hosts)


def test_a_run_collects_cycles_less_often_and_puts_the_collector_back() -> None:
    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], int]] = []
    with engine.few_collections():
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
    assert seen[0][0][0] == engine.GC_GEN0 and seen[0][1] > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_csv_loader(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp,deployment,duration\n1000.5,b,0.2\n1000.0,a,1\n1010,a,2\n")
    tr = load_csv(p)
    assert tr.names == ["a", "b"]
    assert tr.arrivals[0].tolist() == [0.0, 10.0] and tr.durations[0].tolist() == [1.0, 2.0]
    assert tr.arrivals[1].tolist() == [0.5] and tr.horizon_s == 11.0
    p.write_text("1000,a,1\n1001,a.b,1\n")
    with pytest.raises(ConfigError, match=r"t.csv:2: deployment"):
        load_csv(p)
    p.write_text("1000,a,-1\n")
    with pytest.raises(ConfigError, match=r"t.csv:1: duration: must be within"):
        load_csv(p)


def test_azure_functions_2019_loader(tmp_path: Path) -> None:
    p = tmp_path / "invocations_per_function_md.anon.d01.csv"
    minutes = [str(m) for m in range(1, 1441)]
    counts = ["0"] * 1440
    counts[0], counts[2] = "2", "1"
    p.write_text(",".join(["HashOwner", "HashApp", "HashFunction", "Trigger", *minutes]) + "\n"
                 + ",".join(["o1", "a1", "f1", "http", *counts]) + "\n"
                 + ",".join(["o1", "a1", "f2", "timer", *(["0"] * 1440)]) + "\n")  # fmt: skip
    tr = load_azure(p, duration_s=0.5)
    assert tr.names == ["fn-f1"] and tr.horizon_s == 86400.0
    a = tr.arrivals[0]
    assert len(a) == 3 and 0 <= a[0] <= a[1] < 60 and 120 <= a[2] < 180
    assert tr.durations[0].tolist() == [0.5] * 3
    p.write_text("Owner,App\n")
    with pytest.raises(ConfigError, match="want the header"):
        load_azure(p)


def test_profile_file_is_checked(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text("cold_s = 12.8\nhot_s = 1.25\n")
    assert load_profile(p).cold(2.35) == 12.8 and load_profile(p).hot(2.35) == 1.25
    p.write_text('cold_z = 1\nhot_s = "fast"\nstore_gib_per_s = 0\n')
    with pytest.raises(ConfigError) as e:
        load_profile(p)
    assert "cold_z: unknown key" in str(e.value) and "hot_s: must be a number" in str(e.value)
    assert "store_gib_per_s: must be above 0" in str(e.value)


def test_the_example_profiles_load() -> None:
    """examples/simulate/ holds profiles, not deployment specs (tests/test_spec.py loads those)."""
    found = sorted((Path(__file__).resolve().parents[1] / "examples" / "simulate").glob("*.toml"))
    assert found
    for path in found:
        assert load_profile(path) != Profile(), path  # each sets something


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    main = "import sys; from snapscale.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", main, "simulate", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_refuses_bad_arguments_at_the_door(tmp_path: Path) -> None:
    r = _cli("--deployments", "0")
    assert r.returncode == 2 and "--deployments: must be within [1" in r.stderr
    r = _cli("--tick", "0s")
    assert r.returncode == 2 and "--tick: must be within" in r.stderr
    r = _cli("--csv", str(tmp_path / "none.csv"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_cli_small_run_writes_table_json_and_plots(tmp_path: Path) -> None:
    r = _cli(
        "--deployments", "30", "--requests", "2000", "--horizon", "2h", "--hosts", "2", "--out", str(tmp_path)
    )
    assert r.returncode == 0, r.stderr
    assert "tiers-prefetch" in r.stdout and "events/s" in r.stdout and "peak memory" in r.stdout
    doc = json.loads((tmp_path / "fleet.json").read_text())
    assert next(p["policy"] for p in doc["policies"]) == "always-on" and doc["deployments"] == 30
    for f in ("fleet-tradeoff.png", "fleet-tradeoff.svg", "fleet-replicas.png", "fleet-replicas.svg"):
        assert (tmp_path / f).stat().st_size > 1000
