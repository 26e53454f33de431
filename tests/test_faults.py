"""Fault injection on the real parts: nats-server, CRIU, the CPU sample sandbox, the restorer and
freezer as processes (so SIGKILL is a real crash), the scaler in-process.

A service is stopped at a known phase by a pause point (`SNAPSCALE_PAUSE_AT=<point>:<flag>`,
shared/core/pause.py): it creates the flag file and waits there, the test SIGKILLs it, checks that
the crash did leave something, restarts it, and checks that nothing is left but the replica that
serves: no process, no network namespace, no mount, no image or staging dir; and that the
scale-up (or the freeze) completes. docs/reliability.md lists these faults with what they showed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import S3Server, start_nats
from engine_helpers import ROOT, kill_tagged, procs_with
from faultproxy import FaultProxy
from nats.aio.msg import Msg
from restorer_harness import Harness, follow, get, procs, running, service_env
from test_scaler_service import running as running_parts

from snapscale.demo.procs import wait_port
from snapscale.restorer.cleanup import owned_netns
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.service import Scaler
from snapscale.shared import bus
from snapscale.shared.bus.messages import (
    CheckpointEvent,
    FreezeCommand,
    ReplicaEvent,
    ReplicaState,
    Tier,
    decode_message,
)
from snapscale.shared.bus.spec import DeploymentSpec, FreezeSpec, ReadySpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.pause import ENV as PAUSE_ENV
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import netns
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.registry import SandboxRegistry

pytestmark = pytest.mark.criu
__all__ = ["procs"]  # fixtures

S = ReplicaState
RESTARTED = "the restorer restarted mid-restore; what it had started was cleaned up"
RECOVER_S = 30.0  # a replacement's bound after a restart; the host used to be avoided for 60 s


# --- processes -------------------------------------------------------------------------------
@pytest.fixture
async def h(settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path) -> AsyncIterator[Harness]:
    tag = f"fault-{uuid.uuid4().hex[:10]}"
    yield Harness(settings, the_bus, criu, tag, tmp_path)
    kill_tagged(tag)
    for name in owned_netns(tmp_path, keep=set()):  # a failed test leaves the host clean anyway
        await netns.delete_netns(name)


def spawn(h: Harness, service: str, log: Path, pause: str | None = None) -> subprocess.Popen[bytes]:
    """`snapscale restorer|freezer` as its own process; `pause` = `<point>:<flag>` stops it there."""
    env = service_env(h.settings, h.criu)
    if pause:
        env[PAUSE_ENV] = pause
    argv = [sys.executable, "-m", "snapscale", service, "--host", h.host]
    if service == "freezer":
        argv += ["--ack-wait-s", "2"]  # a killed freeze comes back to the restarted freezer soon
    with open(log, "ab") as f:
        return subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def kill(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(10)


def tail(log: Path | None) -> str:
    return log.read_text()[-3000:] if log is not None and log.exists() else ""


async def until(cond: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}\n{tail(log)}")
        await asyncio.sleep(0.05)


async def next_event(
    h: Harness, after: int, match: Callable[[ReplicaEvent], bool], timeout_s: float, log: Path
) -> ReplicaEvent:
    found: list[ReplicaEvent] = []

    def seen() -> bool:
        found[:] = [e for e in h.events[after:] if match(e)]
        return bool(found)

    await until(seen, timeout_s, "a matching replica event", log)
    return found[0]


def failed_by_restart(replica: str) -> Callable[[ReplicaEvent], bool]:
    """The restarted restorer's report (the scaler may have failed it first: its host went silent)."""
    return lambda e: e.replica == replica and e.state is S.FAILED and e.reason == RESTARTED


def said_at_start(log: Path) -> dict[str, list[str]]:
    """The last start's cleanup lines (one a kind): kind -> the names it says it removed."""
    out: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        if "at start: removed " in line:
            n, _, rest = line.split("at start: removed ", 1)[1].partition(" ")
            kind, _, names = rest.partition(": ")
            out[kind] = names.split(", ")
            assert len(out[kind]) == int(n), line
        elif "at start: no " in line:
            out[line.split("at start: no ", 1)[1].removesuffix(" left behind")] = []
    return out


# --- what is left ------------------------------------------------------------------------------
def left_behind(h: Harness) -> dict[str, list[str]]:
    """What the test's services and sandboxes left on the host, less the live replicas (those the
    registry holds) and their processes and namespaces."""
    live = SandboxRegistry(h.settings.state_dir).all()
    theirs = {p for sb in live for p in netns.pids_in_netns(sb.netns)}
    procs = (set(procs_with(h.tag)) | set(procs_with(str(h.tmp)))) - theirs
    work = h.settings.state_dir / "restorer"
    staging = h.settings.state_dir / "freezer" / "staging"
    return {
        "processes": sorted(str(p) for p in procs),
        "netns": owned_netns(h.tmp, keep={sb.netns for sb in live}),
        "mounts": [m for m in Path("/proc/self/mountinfo").read_text().splitlines() if str(h.tmp) in m],
        "image dirs": sorted(p.name for p in (work / "images").glob("*")),
        "staging dirs": sorted(p.name for p in staging.glob("*")),
    }


KINDS = ("processes", "netns", "mounts", "image dirs", "staging dirs")
NOTHING: dict[str, list[str]] = {k: [] for k in KINDS}


def one_replica(spec: DeploymentSpec) -> DeploymentSpec:
    """The scaler keeps exactly one replica up, traffic or not."""
    scaling = replace(spec.scaling, min_replicas=1, max_replicas=1, ready_timeout_s=120.0)
    return replace(spec, scaling=scaling)


@contextlib.asynccontextmanager
async def scaler(settings: Settings) -> AsyncIterator[Scaler]:
    sc = Scaler(settings, ScalerConfig(tick_s=0.2, lease_s=1.0))
    async with running_parts(sc.run):
        yield sc


@contextlib.asynccontextmanager
async def checkpoint_events(b: bus.Bus) -> AsyncIterator[list[CheckpointEvent]]:
    got: list[CheckpointEvent] = []

    async def on(m: Msg) -> None:
        got.append(decode_message(m.data, CheckpointEvent))

    sub = await b.nc.subscribe(b.subjects.evt_checkpoint_all(), cb=on)
    try:
        yield got
    finally:
        await sub.unsubscribe()


# --- a restore, killed at each phase ----------------------------------------------------------
# what the crash leaves at each point, before the restart cleans it
EXPECTED = {
    "prefetch": {"image dirs"},
    "materialize": {"image dirs"},
    "criu_restore": {"image dirs", "netns"},  # made, nothing in it yet
    "after_restore": {"image dirs", "netns", "processes"},  # restored, in no registry
}


@pytest.mark.parametrize("point", list(EXPECTED))
async def test_restorer_killed_mid_restore_leaves_nothing_and_the_scaler_replaces_at_once(
    point: str, h: Harness, procs: list[subprocess.Popen[bytes]]
) -> None:
    spec = one_replica(h.spec())
    await h.make_checkpoint(spec)
    log, flag = h.tmp / "restorer.log", h.tmp / "paused"
    async for _ in follow(h):
        await h.deploy(spec)
        procs.append(spawn(h, "restorer", log, pause=f"{point}:{flag}"))
        async with scaler(h.settings):
            await until(flag.exists, 60, f"the restorer paused at {point}", log)
            kill(procs[-1])
            (cut,) = {e.replica for e in h.events if e.state is S.RESTORING}
            left = left_behind(h)
            assert {k for k, v in left.items() if v} == EXPECTED[point], left

            n = len(h.events)
            t0 = time.monotonic()
            procs.append(spawn(h, "restorer", log))
            await next_event(h, n, failed_by_restart(cut), 30, log)
            up = await next_event(h, n, lambda e: e.state is S.READY, RECOVER_S, log)
            took = time.monotonic() - t0
        assert up.replica != cut and up.tier is Tier.CACHE, up  # its chunks are in the cache
        assert took < RECOVER_S
        await get(up.endpoint, "/generate")
        assert left_behind(h) == NOTHING
        said = said_at_start(log)  # one line a kind, with what it removed
        assert said["half-assembled image dirs"] == left["image dirs"]
        assert len(said["run dirs of cut-short restores"]) == 1
        assert said["network namespaces of unknown sandboxes"] == left["netns"]
        assert set(left["processes"]) <= set(said["processes of unknown sandboxes"])


# --- a cold boot, killed while it waits for ready ------------------------------------------------
async def test_cold_boot_cut_by_a_restart_is_re_adopted_and_still_auto_frozen(
    h: Harness, procs: list[subprocess.Popen[bytes]]
) -> None:
    ready = h.tmp / "ready"  # the replica is ready once this file exists: the test decides when
    spec = h.spec(ready=ReadySpec(http_path=None, file=str(ready), timeout_s=120.0, interval_s=0.05))
    spec = replace(spec, freeze=FreezeSpec(after_ready=True, keep_running=True))
    log = h.tmp / "restorer.log"
    registry = SandboxRegistry(h.settings.state_dir)
    async for _ in follow(h):
        async with checkpoint_events(h.bus) as frozen:
            await h.deploy(spec)
            procs.append(spawn(h, "freezer", h.tmp / "freezer.log"))
            procs.append(spawn(h, "restorer", log))
            cmd = await h.restore(spec.name, "r1", deadline_s=300)
            await h.wait("r1", frozenset({S.STARTING}))
            await until(lambda: registry.get("r1") is not None, 30, "the sandbox in the registry", log)
            kill(procs[-1])
            ready.touch()

            n = len(h.events)
            procs.append(spawn(h, "restorer", log))
            back = await h.wait("r1", frozenset({S.READY}), after=n)
            assert back.reason == "re-adopted after a restorer restart" and back.tier is Tier.COLD
            await until(lambda: any(e.ok and not e.skipped for e in frozen), 60, "auto-frozen", log)
        (ev,) = frozen
        assert ev.command_id == f"auto-{cmd.id}" and ev.replica == "r1" and ev.checkpoint_id
        await get(back.endpoint, "/generate")  # frozen and still serving
        assert left_behind(h) == NOTHING


# --- a freeze, killed mid-dump and mid-upload ----------------------------------------------------
@pytest.mark.parametrize("point", ["criu_dump", "upload"])
async def test_freezer_killed_mid_freeze_leaves_nothing_and_the_checkpoint_restores(
    point: str, h: Harness, procs: list[subprocess.Popen[bytes]]
) -> None:
    spec = await h.deploy(h.spec())
    log, flag = h.tmp / "freezer.log", h.tmp / "paused"
    async for _ in follow(h):
        async with running(h.settings, h.criu), checkpoint_events(h.bus) as frozen:
            await h.restore(spec.name, "r1")
            r1 = await h.wait("r1")
            assert r1.state is S.READY, r1.reason
            procs.append(spawn(h, "freezer", log, pause=f"{point}:{flag}"))
            cmd = FreezeCommand(f"f-{uuid.uuid4().hex[:8]}", spec.name, "r1", time.time(), force=True)
            await h.send(Verb.FREEZE, cmd, msg_id=cmd.id)
            await until(flag.exists, 60, f"the freezer paused at {point}", log)
            kill(procs[-1])
            assert left_behind(h)["staging dirs"] != []  # a partial image, or a whole one not uploaded

            procs.append(spawn(h, "freezer", log))
            await until(lambda: bool(frozen), 60, "the freeze done after the restart", log)
            (ev,) = frozen
            assert ev.ok and not ev.skipped and ev.command_id == cmd.id, ev.reason
            await get(r1.endpoint, "/generate")  # the replica it froze serves on
            assert left_behind(h) == NOTHING

            await h.restore(spec.name, "r2", checkpoint_id=ev.checkpoint_id)
            r2 = await h.wait("r2")
            assert r2.state is S.READY and r2.tier in (Tier.STORE, Tier.CACHE), r2.reason
            assert r2.checkpoint_id == ev.checkpoint_id
            await get(r2.endpoint, "/generate")
    assert left_behind(h) == NOTHING


# --- the store goes away during a restore -------------------------------------------------------
async def test_store_unreachable_during_a_restore_boots_cold_saying_why(
    h: Harness, s3_settings: Settings, s3_server: S3Server
) -> None:
    h.settings = s3_settings  # the same state and cache dirs, the store on moto's S3
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    proxy = await FaultProxy(s3_server.endpoint_url).start()
    try:
        proxy.reset_next(10**9, path_contains="/chunks/")  # manifests pass
        via_proxy = replace(h.settings, store=replace(h.settings.store, endpoint_url=proxy.url))
        async for _ in follow(h):
            async with running(via_proxy, h.criu):
                await h.restore(spec.name, "r1", deadline_s=120)
                ev = await h.wait("r1", timeout_s=90)
                assert proxy.stats.injected > 0  # it did reach for the chunks
                assert ev.state is S.READY and ev.tier is Tier.COLD, ev.reason
                assert f"restore of {frozen.entry.checkpoint_id} failed" in ev.reason
                assert "store unreachable" in ev.reason, ev.reason
                await get(ev.endpoint, "/generate")
                assert left_behind(h) == NOTHING
    finally:
        await proxy.stop()


# --- nats-server restarted during a scale-up ------------------------------------------------------
async def test_nats_server_restarted_during_a_scale_up_loses_nothing(h: Harness, tmp_path: Path) -> None:
    (tmp_path / "own-nats").mkdir()
    srv = start_nats(tmp_path / "own-nats")
    argv = [str(srv.proc.args[0]), "-a", "127.0.0.1", "-p", str(srv.port), "-js", "-sd", str(srv.store_dir)]  # type: ignore[index]
    servers = [srv.proc]
    settings = replace(h.settings, nats_url=srv.url)
    own = await bus.open_bus(settings, "test-own")
    try:
        o = Harness(settings, own, h.criu, h.tag, h.tmp)
        ready = tmp_path / "ready"
        spec = o.spec(ready=ReadySpec(http_path=None, file=str(ready), timeout_s=120.0, interval_s=0.05))
        async for _ in follow(o):
            await o.deploy(one_replica(spec))
            async with running(settings, h.criu) as (svc, _task), scaler(settings) as sc:
                await until(lambda: any(e.state is S.STARTING for e in o.events), 60, "a cold boot started")
                srv.proc.terminate()
                srv.proc.wait(10)
                await asyncio.sleep(1.5)
                servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # noqa: ASYNC220
                await asyncio.to_thread(wait_port, srv.port)
                ready.touch()  # ready only now: the ready event goes out on the new server
                await until(lambda: [t.ev.state for t in sc.view.of(spec.name)] == [S.READY], 60, "ready")
                (starting,) = {e.replica for e in o.events if e.state is S.STARTING}
                (live,) = sc.view.of(spec.name)
                assert live.ev.replica == starting  # the one it started, not a second one
                assert svc.host is not None and list(svc.host.replicas.live) == [starting]
                got = await bus.kv_get(own.kv[Bucket.REPLICAS], f"{spec.name}.{starting}")
                assert got is not None and decode_message(got[0], ReplicaEvent).state is S.READY
                await asyncio.sleep(2.0)  # and no second replica comes later
                assert [t.ev.replica for t in sc.view.of(spec.name)] == [starting]
                await get(live.ev.endpoint, "/generate")
    finally:
        await own.close()
        for p in servers:
            p.terminate()
            p.wait(10)
    assert left_behind(h) == NOTHING
