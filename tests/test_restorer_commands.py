"""The restorer's other duties through the service: prefetch commands, two restores sharing one
prefetch, deadlines, releasing a replica still coming up, the suspend budget, the auto-freeze
hand-off, the inventory's compat keys and `snapscale status`. Real NATS, S3 and CRIU."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from engine_helpers import ROOT, kill_tagged, procs_with
from nats.aio.msg import Msg
from restorer_harness import Harness, follow, running, service_env

from snapscale.restorer.deaths import STOPPED_BY_FREEZE
from snapscale.shared import bus
from snapscale.shared.bus.messages import (
    FreezeCommand,
    GpuInfo,
    HostHeartbeat,
    PrefetchCommand,
    ReleaseMode,
    ReplicaState,
    Tier,
    decode_message,
)
from snapscale.shared.bus.spec import FreezeSpec, ReadySpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import compat, lifecycle, sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.registry import SandboxRegistry

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> AsyncIterator[Harness]:
    tag = f"rcmd-{uuid.uuid4().hex[:10]}"
    harness = Harness(s3_settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def heartbeat(h: Harness, ok: object, timeout_s: float = 10.0) -> HostHeartbeat:
    assert callable(ok)
    deadline = time.monotonic() + timeout_s
    hb: HostHeartbeat | None = None
    while time.monotonic() < deadline:
        got = await bus.kv_get(h.bus.kv[Bucket.HOSTS], h.host)
        hb = decode_message(got[0], HostHeartbeat) if got else None
        if hb is not None and ok(hb):
            return hb
        await asyncio.sleep(0.1)
    raise AssertionError(f"no matching heartbeat in {timeout_s}s; last {hb}")


async def test_prefetch_command_warms_the_cache_then_restore_fetches_nothing(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    ckpt = frozen.entry.checkpoint_id
    async with running(h.settings, h.criu):
        # the heartbeat names this host's key per deployment: the catalog's key for it
        hb = await heartbeat(h, lambda hb: spec.name in hb.compat_hashes)
        assert hb.compat_hashes[spec.name] == compat.host_key(spec, criu=h.criu, gpu_count=0).hash()
        assert hb.compat_hashes[spec.name] == frozen.entry.compat_hash
        # it has read the catalog: the checkpoint is known, none of it cached yet
        hb = await heartbeat(h, lambda hb: ckpt in hb.cached_bytes)
        assert hb.cached_bytes[ckpt] == 0 and ckpt not in hb.cached_checkpoints

        await h.send(Verb.PREFETCH, PrefetchCommand(id="p1", deployment=spec.name, issued_at=time.time()))
        hb = await heartbeat(h, lambda hb: ckpt in hb.cached_checkpoints)
        assert hb.cached_bytes[ckpt] == frozen.manifest.unique_bytes

    await h.bus.kv[Bucket.HOSTS].delete(h.host)
    async with running(h.settings, h.criu):
        # a restarted restorer finds its cache and reports the checkpoint before any restore
        hb = await heartbeat(h, lambda hb: ckpt in hb.cached_checkpoints)
        assert hb.cached_bytes[ckpt] == frozen.manifest.unique_bytes

        await h.restore(spec.name, "r1")
        ev = await h.wait("r1")
        assert ev.tier is Tier.CACHE and ev.bytes["fetched"] == 0, ev
        assert ev.reason == "no suspended replica"


async def test_a_command_allowing_only_the_store_tier_restores(h: Harness) -> None:
    # neither resume nor cold allowed: the tier choice must wait for the checkpoint lookup
    spec = await h.deploy(h.spec())
    await h.make_checkpoint(spec)
    async with running(h.settings, h.criu):
        await h.restore(spec.name, "only-store", allow_tiers=[Tier.STORE])
        ev = await h.wait("only-store")
    assert ev.tier is Tier.STORE, ev.reason


async def test_two_restores_of_one_checkpoint_share_one_prefetch(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    async with running(h.settings, h.criu):
        await asyncio.gather(h.restore(spec.name, "a"), h.restore(spec.name, "b"))
        a, b = await h.wait("a"), await h.wait("b")
    assert a.tier is Tier.STORE and b.tier is Tier.STORE, (a.reason, b.reason)
    # one of them downloaded the image, the other waited on that download
    assert sorted([a.bytes["fetched"], b.bytes["fetched"]]) == [0, frozen.manifest.unique_bytes]
    assert sorted([a.bytes["joined"], b.bytes["joined"]]) == [0, frozen.manifest.unique_bytes]


async def test_deadlines(h: Harness) -> None:
    flag = h.tmp / "never"
    slow = await h.deploy(h.spec("slow", ready=ReadySpec(http_path=None, file=str(flag), timeout_s=60.0)))
    async with running(h.settings, h.criu) as (svc, _):
        # issued long ago: refused before anything starts
        await h.restore(slow.name, "old", deadline_s=1.0, issued_at=time.time() - 5)
        ev = await h.wait("old")
        assert ev.state is ReplicaState.FAILED and "passed before the restore started" in ev.reason
        # outlives its deadline while booting: abandoned, reported failed, nothing left running
        await h.restore(slow.name, "late", deadline_s=2.0)
        ev = await h.wait("late", timeout_s=20)
        assert ev.state is ReplicaState.FAILED and ev.reason == "timed out (deadline of 2s exceeded)"
        await asyncio.sleep(0.2)
        assert procs_with(h.tag) == []
        assert svc.host is not None and svc.host.tools.slots.held == {}


async def test_release_while_starting_stops_it(h: Harness) -> None:
    flag = h.tmp / "never"
    slow = await h.deploy(h.spec("slow", ready=ReadySpec(http_path=None, file=str(flag), timeout_s=60.0)))
    async with running(h.settings, h.criu) as (svc, _):
        await h.restore(slow.name, "r1")
        await h.wait("r1", frozenset({ReplicaState.STARTING}))
        for _ in range(100):
            if procs_with(h.tag):
                break
            await asyncio.sleep(0.05)
        await h.release(slow.name, "r1", ReleaseMode.STOP)
        ev = await h.wait("r1")
        assert ev.state is ReplicaState.FAILED and ev.reason == "released while starting"
        await asyncio.sleep(0.2)
        assert procs_with(h.tag) == []
        assert svc.host is not None and svc.host.tools.slots.held == {} and svc.host.replicas.live == {}
        # and a release of what is not here is a no-op success
        await h.release(slow.name, "nobody", ReleaseMode.STOP)
        await asyncio.sleep(0.5)
        assert h.of("nobody") == []


async def test_a_replica_a_freeze_stops_is_reported_stopped_not_failed(h: Harness) -> None:
    """`snapscale freeze` without keep-running ends a ready replica on purpose (the freezer runs the
    engine on the restorer's sandbox): the restorer's death watch reports it stopped, frees its
    slot, and does not call it a failure."""
    d = await h.deploy(h.spec("frozen-stop"))
    async with running(h.settings, h.criu) as (svc, _):
        await h.restore(d.name, "fs1")
        assert (await h.wait("fs1")).state is ReplicaState.READY
        sb = SandboxRegistry(h.settings.state_dir).get("fs1")
        assert sb is not None
        await lifecycle.freeze(sb, d, h.tmp / "fs1-img", keep_running=False, criu=h.criu)
        ev = await h.wait("fs1", frozenset({ReplicaState.STOPPED, ReplicaState.FAILED}))
        assert ev.state is ReplicaState.STOPPED and ev.reason == STOPPED_BY_FREEZE, ev
        assert svc.host is not None and svc.host.tools.slots.held == {} and svc.host.replicas.live == {}


async def test_suspend_budget_stops_the_oldest(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    async with running(h.settings, h.criu, cpu_slots=2) as (svc, _):
        assert svc.host is not None
        for r in ("r1", "r2"):
            await h.restore(spec.name, r)
            assert (await h.wait(r)).state is ReplicaState.READY
        await h.release(spec.name, "r1", ReleaseMode.SUSPEND)
        await h.wait("r1", frozenset({ReplicaState.SUSPENDED}))
        r1 = svc.host.replicas.live["r1"]
        assert r1.rss_bytes > 1 << 20
        assert _state(r1.sandbox.pid) == "T"  # a CPU sandbox is stopped in place
        # room for about one more suspended replica of this size, not two: the tools are fixed for a
        # run, so the next command (the release below) is handed a host with a smaller budget
        t = svc.host.tools
        tighter = replace(t.config, suspend_budget_bytes=int(r1.rss_bytes * 1.5))
        svc.host = replace(svc.host, tools=replace(t, config=tighter))
        await h.release(spec.name, "r2", ReleaseMode.SUSPEND)
        await h.wait("r2", frozenset({ReplicaState.SUSPENDED}))
        stopped = await h.wait("r1", frozenset({ReplicaState.STOPPED}))
        assert stopped.reason.startswith("suspend budget ") and "oldest suspended stopped" in stopped.reason
        assert not sandbox.is_running(r1.sandbox)
        assert list(svc.host.replicas.live) == ["r2"]
        hb = await heartbeat(h, lambda hb: [r.replica for r in hb.replicas] == ["r2"])
        assert hb.suspend_used_bytes == svc.host.replicas.live["r2"].rss_bytes > 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_cold_boot_of_a_spec_that_wants_freezing_asks_the_freezer(h: Harness) -> None:
    spec = await h.deploy(replace(h.spec("auto"), freeze=FreezeSpec(after_ready=True)))
    plain = await h.deploy(h.spec("plain"))
    asked: list[FreezeCommand] = []

    async def on(m: Msg) -> None:
        asked.append(decode_message(m.data, FreezeCommand))

    sub = await h.bus.nc.subscribe(h.bus.subjects.cmd(Verb.FREEZE, h.host), cb=on)
    try:
        async with running(h.settings, h.criu):
            await h.restore(plain.name, "p1")
            await h.restore(spec.name, "a1")
            assert (await h.wait("p1")).tier is Tier.COLD
            assert (await h.wait("a1")).tier is Tier.COLD
            for _ in range(40):
                if asked:
                    break
                await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()
    assert [(c.deployment, c.replica, c.keep_running, c.force) for c in asked] == [
        ("auto", "a1", True, False)
    ]


async def test_status_verb(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    async with running(h.settings, h.criu):
        await h.restore(spec.name, "r1")
        r1 = await h.wait("r1")
        assert r1.state is ReplicaState.READY
        assert r1.tier is Tier.STORE, r1.reason  # else nothing was prefetched into the cache
        await heartbeat(h, lambda hb: frozen.entry.checkpoint_id in hb.cached_checkpoints)
        env = service_env(h.settings, h.criu)
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "snapscale", "status", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        doc = json.loads(out.stdout)
        table = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "snapscale", "status"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    assert [x["host"] for x in doc["hosts"]] == [h.host]
    assert doc["hosts"][0]["cached_checkpoints"] == [frozen.entry.checkpoint_id]
    (rep,) = doc["replicas"]
    assert (rep["replica"], rep["state"], rep["tier"]) == ("r1", "ready", "store")
    assert [c["checkpoint_id"] for c in doc["checkpoints"]] == [frozen.entry.checkpoint_id]
    text = table.stdout
    for needle in ("HOSTS", "REPLICAS", "CHECKPOINTS", "HOST CACHES", h.host, "r1", "ready", "store"):
        assert needle in text, text
    assert frozen.entry.checkpoint_id in text


async def test_stopping_the_service_mid_boot_cleans_up_and_says_so(h: Harness) -> None:
    flag = h.tmp / "never"
    slow = await h.deploy(h.spec("slow", ready=ReadySpec(http_path=None, file=str(flag), timeout_s=60.0)))
    async with running(h.settings, h.criu, drain_s=0.5):
        await h.restore(slow.name, "r1")
        await h.wait("r1", frozenset({ReplicaState.STARTING}))
    ev = await h.wait("r1", timeout_s=10)
    assert ev.state is ReplicaState.FAILED and ev.reason == "the restorer stopped while it was starting"
    assert procs_with(h.tag) == []


async def test_a_gpu_replica_whose_suspend_fails_is_stopped_and_frees_its_gpu(h: Harness) -> None:
    spec = await h.deploy(replace(h.spec(), gpus=1))
    async with running(h.settings, h.criu) as (svc, _):
        assert svc.host is not None
        svc.host.tools.slots.gpus.append(GpuInfo(0, "GPU-here", "test-gpu", 1 << 30))  # no driver behind it
        await h.restore(spec.name, "g1")
        ev = await h.wait("g1")
        assert ev.state is ReplicaState.READY and ev.gpu_uuids == ["GPU-here"]
        assert svc.host.tools.slots.free_gpus() == []
        await h.release(spec.name, "g1", ReleaseMode.SUSPEND)
        gone = await h.wait("g1", frozenset({ReplicaState.STOPPED}))
        assert gone.reason.startswith("suspend failed, stopped instead: cuda: no CUDA"), gone.reason
        assert svc.host.tools.slots.free_gpus() == ["GPU-here"] and svc.host.replicas.live == {}
        hb = await heartbeat(h, lambda hb: hb.gpus and hb.gpus[0].free)
        assert [g.uuid for g in hb.gpus] == ["GPU-here"]
