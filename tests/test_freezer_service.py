"""The freezer service on real parts: nats-server, moto's S3 server, CRIU 4.2.1, and the engine's
CPU sample sandbox launched with the engine API and recorded in the registry as the restorer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Server, settings_env
from faultproxy import FaultProxy
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from examples import sample_server
from snapscale.freezer.config import FreezerConfig
from snapscale.freezer.ledger import Ledger, Phase
from snapscale.freezer.service import serve
from snapscale.shared import bus
from snapscale.shared.bus import catalog
from snapscale.shared.bus.messages import (
    CheckpointEvent,
    FreezeCommand,
    ReplicaEvent,
    ReplicaState,
    encode_message,
)
from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core import telemetry
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import sandbox
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.registry import SandboxRegistry
from snapscale.shared.engine.sandbox import Sandbox
from snapscale.shared.store.backend import open_store
from snapscale.shared.store.checkpoint import fetch_manifest, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = FreezerConfig(ack_wait_s=3.0, claim_ttl_s=30.0, drain_s=60.0)


def sample_spec(
    name: str, tmp: Path, *, preset: str = "tiny", hooks: HooksSpec | None = None
) -> DeploymentSpec:
    return DeploymentSpec(
        name=name,
        command=sample_server.command(preset, weights=tmp / "weights.pt", tag=f"freezer-test-{name}"),
        cwd=str(ROOT),
        hooks=hooks
        or HooksSpec(
            before_freeze="/hooks/before_freeze", after_restore="/hooks/after_restore", timeout_s=20.0
        ),
        ready=ReadySpec(http_path="/healthz", timeout_s=120.0),
    )


async def put_spec(b: bus.Bus, spec: DeploymentSpec) -> None:
    await b.kv[Bucket.DEPLOYMENTS].put(spec.name, spec.to_json())


@contextlib.asynccontextmanager
async def running_sandbox(
    settings: Settings, spec: DeploymentSpec, replica: str, *also: Settings
) -> AsyncIterator[Sandbox]:
    """Cold-boot the sample with the engine and record it in the registry (of every host given)."""
    sb = await engine.launch(spec, replica, gpu_uuids=[], run_dir=settings.state_dir / "run" / replica)
    try:
        await engine.wait_ready(sb, spec.ready, cwd=spec.cwd)
        for s in (settings, *also):
            SandboxRegistry(s.state_dir).put(sb)
        yield sb
    finally:
        await engine.stop(sb)


@contextlib.asynccontextmanager
async def running_freezer(
    settings: Settings,
    criu: CriuBinary,
    opts: FreezerConfig = FAST,
    on_phase: Callable[[Phase], Awaitable[None]] | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve(settings, opts, stop=stop, criu=criu, started=started, on_phase=on_phase)
    )
    await asyncio.wait({task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what stopped it
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def checkpoint_events(b: bus.Bus, deployment: str) -> AsyncIterator[asyncio.Queue[CheckpointEvent]]:
    q: asyncio.Queue[CheckpointEvent] = asyncio.Queue()

    async def on(ev: CheckpointEvent, _m: Msg) -> None:
        await q.put(ev)

    sub, _ = await bus.subscribe_core(b, b.subjects.evt_checkpoint(deployment), CheckpointEvent, on)
    try:
        yield q
    finally:
        await sub.unsubscribe()  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def freezing(
    settings: Settings,
    b: bus.Bus,
    criu: CriuBinary,
    spec: DeploymentSpec,
    opts: FreezerConfig = FAST,
    on_phase: Callable[[Phase], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[Sandbox, asyncio.Queue[CheckpointEvent]]]:
    """`spec` deployed, its sample up as a fresh replica, a freezer serving, and the queue of the
    deployment's checkpoint events: what every freeze test starts from."""
    await put_spec(b, spec)
    async with (
        running_sandbox(settings, spec, f"r-{uuid.uuid4().hex[:6]}") as sb,
        running_freezer(settings, criu, opts, on_phase),
        checkpoint_events(b, spec.name) as events,
    ):
        yield sb, events


def answer(sb: Sandbox) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{sb.endpoint}/generate", timeout=10) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


def status_of(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as r:
        return int(r.status)


def freeze_cmd(
    spec: DeploymentSpec, replica: str, *, force: bool = False, keep_running: bool = True
) -> FreezeCommand:
    return FreezeCommand(
        id=f"c-{uuid.uuid4().hex[:12]}", deployment=spec.name, replica=replica, issued_at=time.time(),
        force=force, keep_running=keep_running,
    )  # fmt: skip


async def send(b: bus.Bus, host: str, cmd: FreezeCommand | bytes, *, dedup: bool = True) -> None:
    subject = b.subjects.cmd(Verb.FREEZE, host)
    if isinstance(cmd, bytes):
        await b.js.publish(subject, cmd)
    else:
        await bus.publish(b, subject, cmd, msg_id=cmd.id if dedup else None)


async def next_event(q: asyncio.Queue[CheckpointEvent], timeout_s: float = 120.0) -> CheckpointEvent:
    return await asyncio.wait_for(q.get(), timeout_s)


def spans_of(exp: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exp.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


async def no_redelivery_while_freezing(
    b: bus.Bus, settings: Settings, command_id: str, *, for_s: float
) -> None:
    """Pull from the freezer's own durable while its freeze runs: with in_progress() working the
    command is never offered again, however many ack waits the freeze lasts."""
    ledger = Ledger(settings.state_dir)
    await eventually(lambda: ledger.attempt(command_id) is not None)  # the freezer has it and works
    sub = await b.js.pull_subscribe(
        b.subjects.cmd(Verb.FREEZE, settings.host_id),
        durable=b.subjects.durable("freezer", Verb.FREEZE, settings.host_id),
    )
    try:
        got = await sub.fetch(1, timeout=for_s)
    except TimeoutError:
        return
    finally:
        await sub.unsubscribe()
    pytest.fail(f"command redelivered while being frozen: {got[0].data!r}")


async def eventually(pred: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / 0.05) + 1):
        if pred():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.criu
async def test_freeze_command_makes_a_checkpoint_and_a_redelivery_does_nothing_new(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    # a store throttled to 10 requests/s makes the freeze outlive its 1 s ack wait several times
    settings = replace(s3_settings, store=replace(s3_settings.store, max_requests_per_s=10))
    spec = sample_spec("sample", tmp_path)
    async with freezing(settings, the_bus, criu, spec, replace(FAST, ack_wait_s=1.0)) as (sb, events):
        before = answer(sb)
        cmd = freeze_cmd(spec, sb.replica)
        tracer = telemetry.tracer("test")
        with tracer.start_as_current_span("operator") as root:
            await send(the_bus, settings.host_id, cmd)
        await no_redelivery_while_freezing(the_bus, settings, cmd.id, for_s=3.0)
        ev = await next_event(events)

        assert ev.ok and not ev.skipped, ev.reason
        assert ev.command_id == cmd.id and ev.replica == sb.replica and ev.host == settings.host_id
        assert ev.checkpoint_id and ev.compat_hash and ev.compat["criu_version"] == criu.version
        assert ev.sizes["total"] > 0 and 0 < ev.sizes["new"] <= ev.sizes["unique"] <= ev.sizes["total"]
        assert ev.timings_s["total_s"] > 3.0  # outlived its ack wait three times over
        info = await the_bus.js.consumer_info(
            the_bus.subjects.cmd_stream, the_bus.subjects.durable("freezer", Verb.FREEZE, settings.host_id)
        )
        assert info.num_redelivered == 0
        for phase in (
            "criu_dump",
            "before_freeze",
            "after_restore",
            "chunk_s",
            "upload_s",
            "catalog_s",
            "total_s",
        ):
            assert phase in ev.timings_s, (phase, ev.timings_s)

        # the catalog entry points at a signed manifest whose every chunk is in S3
        found = await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash)
        assert found is not None
        entry, rev = found
        assert entry.checkpoint_id == ev.checkpoint_id and entry.host == settings.host_id
        async with open_store(settings.store) as store:
            manifest = await fetch_manifest(store, entry.manifest_key, settings.signing_key)
            assert manifest.checkpoint_id == ev.checkpoint_id and manifest.total_bytes == ev.sizes["total"]
            report = await verify_checkpoint(store, manifest, deep=True)
            assert report.ok and report.chunks > 0, report
            manifests = await store.list_manifests(spec.name)
        assert len(manifests) == 1

        # still serving, same answer; the staging dir is gone and the claim released
        assert answer(sb) == before
        assert list(Ledger(settings.state_dir).staging_root.iterdir()) == []
        assert await bus.kv_get(the_bus.kv[Bucket.LEASES], f"freeze.{spec.name}.{ev.compat_hash}") is None

        # one trace, continuing the command's, with a span per phase
        names = {s.name for s in spans_of(spans, root.get_span_context().trace_id)}
        for n in (
            "freeze",
            "engine.before_freeze",
            "engine.criu_dump",
            "chunk_hash",
            "upload",
            "manifest",
            "catalog",
        ):
            assert n in names, (n, names)
        upload = next(s for s in spans_of(spans, root.get_span_context().trace_id) if s.name == "upload")
        assert upload.attributes is not None and upload.attributes["upload.new_bytes"] == ev.sizes["new"]

        # the same command again (a redelivery: same id, past the publish dedup): nothing new
        await send(the_bus, settings.host_id, cmd, dedup=False)
        again = await next_event(events)
        assert again == ev
        assert await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash) == (
            entry,
            rev,
        )
        async with open_store(settings.store) as store:
            assert len(await store.list_manifests(spec.name)) == 1
        assert answer(sb) == before


async def test_malformed_commands_are_terminated_and_the_consumer_keeps_going(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, caplog: pytest.LogCaptureFixture
) -> None:
    host = settings.host_id
    async with running_freezer(settings, criu), checkpoint_events(the_bus, "ghost") as events:
        await send(the_bus, host, b"{not json")
        await send(
            the_bus, host, b'{"v": 1, "type": "freeze", "id": "m1", "deployment": "ghost", "issued_at": 1}'
        )
        await send(the_bus, host, b'{"v": 1, "type": "freeze", "id": "m2", "deployment": "ghost", '
                   b'"replica": "r1", "issued_at": "yesterday"}')  # fmt: skip
        bad_name = FreezeCommand(id="m3", deployment="gh.ost", replica="r1", issued_at=1.0)
        await send(the_bus, host, bad_name)
        await send(the_bus, host, freeze_cmd(replace_name("ghost"), "nobody"))
        escape = freeze_cmd(replace_name("ghost"), "../../etc")
        await send(the_bus, host, escape)
        m1, m2, nobody, escaped = [await next_event(events, 30) for _ in range(4)]

    # refused at the door, each answered by a failed event when its deployment and id can be named
    assert (m1.command_id, m1.ok) == ("m1", False)
    assert m1.reason == "freeze command refused: freeze.replica: missing"
    assert m2.command_id == "m2" and "refused: freeze.issued_at: expected a number" in m2.reason
    assert not nobody.ok and nobody.reason == "no sandbox for replica nobody on host host-a"
    assert escaped.command_id == escape.id and not escaped.ok
    assert "refused: freeze.replica: '../../etc' must match" in escaped.reason
    for expected in ("<body>: not JSON", "freeze.deployment: 'gh.ost' must match"):  # m3: logged only
        assert expected in caplog.text, caplog.text
    ledger = Ledger(settings.state_dir)  # nothing refused reached the ledger
    assert [ledger.outcome(i) for i in ("m1", "m2", "m3", escape.id)] == [None] * 4
    assert ledger.outcome(nobody.command_id or "") == nobody
    durable = the_bus.subjects.durable("freezer", Verb.FREEZE, host)
    for _ in range(50):  # the last ack may still be on its way when the last event arrives
        info = await the_bus.js.consumer_info(the_bus.subjects.cmd_stream, durable)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    assert info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0


def replace_name(name: str) -> DeploymentSpec:
    return DeploymentSpec(name=name, command=["true"])


@pytest.mark.criu
async def test_failed_freeze_is_reported_with_the_step_and_the_sandbox_keeps_serving(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    spec = sample_spec("failing", tmp_path, preset="none", hooks=HooksSpec(before_freeze="/hooks/fail"))
    async with freezing(settings, the_bus, criu, spec) as (sb, events):
        before = answer(sb)
        await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
        ev = await next_event(events)
        assert not ev.ok and not ev.skipped
        assert ev.reason.startswith("before_freeze: POST /hooks/fail answered 500"), ev.reason
        assert answer(sb) == before
        assert await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash) is None
        # the claim is given back, so the next cold boot's auto-freeze may try again
        assert await bus.kv_get(the_bus.kv[Bucket.LEASES], f"freeze.{spec.name}.{ev.compat_hash}") is None
        assert list(Ledger(settings.state_dir).staging_root.iterdir()) == []


@pytest.mark.criu
async def test_auto_freeze_that_loses_the_catalog_race_leaves_the_winner_listed(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    """Its claim expired while it uploaded and another host cataloged first: never overwrite."""
    OTHER = "20000101T000000000Z-0ther0"
    spec = sample_spec("late", tmp_path, preset="none")
    await put_spec(the_bus, spec)
    kv = the_bus.kv[Bucket.CHECKPOINTS]

    async def other_host_wins(phase: Phase) -> None:
        if phase is Phase.UPLOADED:
            (attempt,) = Ledger(settings.state_dir).attempts()
            other = catalog.CatalogEntry(
                deployment=spec.name, compat_hash=attempt.compat_hash, checkpoint_id=OTHER,
                manifest_key="manifests/late/other.json", created_at=time.time(), host="host-z",
            )  # fmt: skip
            await catalog.publish_entry(kv, other)

    async with freezing(settings, the_bus, criu, spec, on_phase=other_host_wins) as (sb, events):
        await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
        ev = await next_event(events)
        assert ev.ok and ev.skipped and ev.checkpoint_id == OTHER, ev
        assert "stays unlisted" in ev.reason
        found = await catalog.lookup_entry(kv, spec.name, ev.compat_hash)
        assert found is not None and found[0].host == "host-z" and found[0].previous_id is None
        assert await bus.kv_get(the_bus.kv[Bucket.LEASES], f"freeze.{spec.name}.{ev.compat_hash}") is None


@pytest.mark.criu
async def test_a_redeploy_after_launch_keys_the_checkpoint_by_the_spec_the_sandbox_runs(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    old = sample_spec("redeployed", tmp_path, preset="none")
    async with freezing(settings, the_bus, criu, old) as (sb, events):
        new = replace(old, command=[*old.command, "--seed", "7"])
        await put_spec(the_bus, new)  # the old replica keeps running the old spec
        await send(the_bus, settings.host_id, freeze_cmd(old, sb.replica))
        ev = await next_event(events)
        assert ev.ok and not ev.skipped, ev.reason
        assert ev.compat["spec_hash"] == old.spec_hash() != new.spec_hash()
        kv = the_bus.kv[Bucket.CHECKPOINTS]
        assert await catalog.lookup_entry(kv, old.name, ev.compat_hash) is not None
        assert [e.compat_hash for e in await catalog.list_entries(kv, old.name)] == [ev.compat_hash]


@pytest.mark.criu
async def test_a_store_outage_naks_the_command_and_its_redelivery_resumes_the_upload(
    s3_settings: Settings,
    s3_server: S3Server,
    the_bus: bus.Bus,
    criu: CriuBinary,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await FaultProxy(s3_server.endpoint_url).start()
    settings = replace(s3_settings, store=replace(s3_settings.store, endpoint_url=proxy.url))
    spec = sample_spec("outage", tmp_path, preset="none")
    await put_spec(the_bus, spec)
    dumped: list[str] = []

    async def outage_once_dumped(phase: Phase) -> None:
        if phase is Phase.DUMPED and not dumped:
            (attempt,) = Ledger(settings.state_dir).attempts()
            dumped.append(attempt.checkpoint_id)
            # longer than the store's own retries (8 attempts, at most ~6.4 s of backoff)
            proxy.fail_for(9.0, method="PUT")

    try:
        async with freezing(settings, the_bus, criu, spec, on_phase=outage_once_dumped) as (sb, events):
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
            ev = await next_event(events, 90)
            assert ev.ok and not ev.skipped, ev.reason
            assert [ev.checkpoint_id] == dumped  # the image frozen before the outage, not a new one
            assert proxy.stats.injected > 0
            # naked, then redelivered: the outage outlasted the store's own retries at least once
            assert "will retry" in caplog.text and "retrying message on" in caplog.text
            found = await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash)
            assert found is not None and found[0].checkpoint_id == ev.checkpoint_id
    finally:
        await proxy.stop()


@pytest.mark.criu
async def test_an_outage_on_the_last_delivery_is_reported_as_failed_not_dropped(
    s3_settings: Settings, s3_server: S3Server, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    proxy = await FaultProxy(s3_server.endpoint_url).start()
    settings = replace(s3_settings, store=replace(s3_settings.store, endpoint_url=proxy.url))
    spec = sample_spec("gaveup", tmp_path, preset="none")
    await put_spec(the_bus, spec)

    async def outage(phase: Phase) -> None:
        if phase is Phase.DUMPED:
            proxy.fail_for(30.0, method="PUT")

    try:
        opts = replace(FAST, max_deliver=1)
        async with freezing(settings, the_bus, criu, spec, opts, on_phase=outage) as (sb, events):
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
            ev = await next_event(events, 90)
            assert not ev.ok and ev.reason.startswith("gave up after 1 deliveries: S3 "), ev.reason
            assert (
                await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash) is None
            )
            assert await bus.kv_get(the_bus.kv[Bucket.LEASES], f"freeze.{spec.name}.{ev.compat_hash}") is None
            led = Ledger(settings.state_dir)
            assert led.attempts() == [] and list(led.staging_root.iterdir()) == []
    finally:
        await proxy.stop()


@pytest.mark.criu
async def test_operator_freeze_with_stop_leaves_a_checkpoint_and_no_sandbox(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    spec = sample_spec("stopped", tmp_path, preset="none")
    async with freezing(settings, the_bus, criu, spec) as (sb, events):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "snapscale", "freeze", spec.name, "--replica", sb.replica,
            "--host", settings.host_id, "--stop", "--timeout-s", "60",
            env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()
        ev = await next_event(events)
        assert ev.ok and not ev.skipped and f"checkpoint {ev.checkpoint_id} of {spec.name}" in out.decode()
        assert "criu_dump" in ev.timings_s and "after_restore" not in ev.timings_s  # it did not resume
        assert not sandbox.is_running(sb)
        assert (
            await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash) is not None
        )

        # a replica that is not there: the verb exits 1 and prints why
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "snapscale", "freeze", spec.name, "--replica", "r-none",
            "--host", settings.host_id, "--timeout-s", "60",
            env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 1, err.decode()
        assert "FAILED: no sandbox for replica r-none on host host-a" in out.decode()


LAUNCH_UNDER_UVLOOP = """
import sys, uvloop
from pathlib import Path
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.registry import SandboxRegistry
from snapscale.shared.bus.spec import DeploymentSpec

async def main() -> None:
    spec = DeploymentSpec.from_json(Path(sys.argv[1]).read_bytes())
    sb = await engine.launch(spec, sys.argv[2], gpu_uuids=[], run_dir=Path(sys.argv[3]))
    await engine.wait_ready(sb, spec.ready, cwd=spec.cwd)
    SandboxRegistry(Path(sys.argv[4])).put(sb)

uvloop.run(main())
"""


@pytest.mark.criu
async def test_a_sandbox_launched_from_a_uvloop_service_can_be_frozen(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    """The restorer cold-boots on uvloop (runtime.run), whose child processes inherit descriptors
    asyncio's loop would close; the auto-freeze that follows must still dump the sandbox."""
    spec = sample_spec("uvloop", tmp_path, preset="none")
    await put_spec(the_bus, spec)
    (tmp_path / "spec.json").write_bytes(spec.to_json())
    replica = f"r-{uuid.uuid4().hex[:6]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCH_UNDER_UVLOOP, str(tmp_path / "spec.json"), replica,
        str(settings.state_dir / "run" / replica), str(settings.state_dir), cwd=str(ROOT),
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    sb = SandboxRegistry(settings.state_dir).get(replica)
    assert sb is not None
    try:
        async with running_freezer(settings, criu), checkpoint_events(the_bus, spec.name) as events:
            before = answer(sb)
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
            ev = await next_event(events)
            assert ev.ok and not ev.skipped, ev.reason
            assert answer(sb) == before
    finally:
        await engine.stop(sb)


async def test_operator_freeze_with_no_freezer_listening_times_out_saying_so(settings: Settings) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapscale", "freeze", "ghost", "--replica", "r1", "--host", "nobody",
        "--timeout-s", "1",
        env=env_for(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and out == b""
    assert "no checkpoint event for command op-" in err.decode()
    assert "is `snapscale freezer --host nobody` running?" in err.decode()


EXTERNAL_PEER = """
import socket, sys, http.server
peer = socket.socket(socket.AF_UNIX)
peer.connect(sys.argv[1])  # a connection to a process outside the sandbox: CRIU refuses to dump it
http.server.HTTPServer(("0.0.0.0", 8000), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


@pytest.mark.criu
async def test_a_criu_failure_is_reported_with_its_log_tail_and_the_sandbox_keeps_serving(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    sock_path = tmp_path / "outside.sock"
    accepted: list[asyncio.StreamWriter] = []

    async def on_peer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    outside = await asyncio.start_unix_server(on_peer, path=str(sock_path))
    spec = DeploymentSpec(
        name="unfreezable",
        command=[sys.executable, "-c", EXTERNAL_PEER, str(sock_path)],
        cwd=str(tmp_path),
        ready=ReadySpec(http_path="/", timeout_s=30.0),
    )
    await put_spec(the_bus, spec)
    try:
        async with freezing(settings, the_bus, criu, spec) as (sb, events):
            assert accepted  # the sandbox holds its connection to us
            await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
            ev = await next_event(events)
            assert not ev.ok and ev.reason.startswith("criu_dump: criu dump exited"), ev.reason
            assert "Error (criu/sk-unix.c" in ev.reason  # CRIU's own last lines: what it could not dump
            assert sandbox.is_running(sb)
            assert status_of(f"http://{sb.endpoint}/") == 200  # still serving
            assert (
                await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash) is None
            )
    finally:
        outside.close()
        for w in accepted:
            w.close()


def env_for(settings: Settings) -> dict[str, str]:
    """The environment a freezer (or operator) subprocess reads its Settings from."""
    return {**os.environ, **settings_env(settings)}


@pytest.mark.criu
async def test_two_freezers_race_for_an_auto_freeze_and_one_wins(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    a = s3_settings
    b = replace(a, host_id="host-b", state_dir=tmp_path / "state-b")
    spec = sample_spec("raced", tmp_path)
    await put_spec(the_bus, spec)
    # one process registered on both hosts: were the claim broken, two CRIU dumps would collide
    async with (
        running_sandbox(a, spec, f"r-{uuid.uuid4().hex[:6]}", b) as sb,
        running_freezer(a, criu),
        running_freezer(b, criu),
        checkpoint_events(the_bus, spec.name) as events,
    ):
        before = answer(sb)
        await asyncio.gather(
            send(the_bus, a.host_id, freeze_cmd(spec, sb.replica)),
            send(the_bus, b.host_id, freeze_cmd(spec, sb.replica)),
        )
        evs = [await next_event(events), await next_event(events)]
        assert all(e.ok for e in evs), [e.reason for e in evs]
        won = [e for e in evs if not e.skipped]
        lost = [e for e in evs if e.skipped]
        assert len(won) == 1 and len(lost) == 1, evs
        w = won[0]
        assert w.checkpoint_id and (
            "is freezing this key" in lost[0].reason or w.checkpoint_id in lost[0].reason
        )
        entry = await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, w.compat_hash)
        assert entry is not None and entry[0].checkpoint_id == w.checkpoint_id and entry[0].host == w.host

        # later auto-freezes skip: the key has its checkpoint
        await send(the_bus, lost[0].host, freeze_cmd(spec, sb.replica))
        late = await next_event(events)
        assert late.ok and late.skipped and f"catalog already has checkpoint {w.checkpoint_id}" in late.reason
        assert late.checkpoint_id == w.checkpoint_id and lost[0].checkpoint_id in (None, w.checkpoint_id)

        # the operator's verb always freezes (replica and host from KV 'replicas'); the old id is kept
        ready = ReplicaEvent(deployment=spec.name, replica=sb.replica, host=lost[0].host,
                             state=ReplicaState.READY, ts=time.time())  # fmt: skip
        await the_bus.kv[Bucket.REPLICAS].put(f"{spec.name}.{sb.replica}", encode_message(ready))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "snapscale", "freeze", spec.name, "--timeout-s", "120",
            env=env_for(a), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 150)
        assert proc.returncode == 0, err.decode()
        forced = await next_event(events)
        assert forced.ok and not forced.skipped and forced.host == lost[0].host
        assert forced.checkpoint_id and forced.checkpoint_id > w.checkpoint_id
        text = out.decode()
        assert (
            f"checkpoint {forced.checkpoint_id} of {spec.name}" in text
            and "total" in text
            and "criu_dump" in text
        )
        assert forced.sizes["new"] < forced.sizes["unique"]  # the second image shares chunks with the first
        entry2 = await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, w.compat_hash)
        assert entry2 is not None
        assert entry2[0].checkpoint_id == forced.checkpoint_id and entry2[0].previous_id == w.checkpoint_id
        assert answer(sb) == before


async def start_freezer_process(
    settings: Settings, log_path: Path, **extra_env: str
) -> asyncio.subprocess.Process:
    env = dict(env_for(settings), **extra_env)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapscale", "freezer", "--host", settings.host_id, "--ack-wait-s", "2",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=open(log_path, "ab"),  # noqa: ASYNC230
    )  # fmt: skip


def log_tail(path: Path) -> str:
    return path.read_text()[-3000:]


def is_dir(path: str) -> bool:
    return os.path.isdir(path)


async def chunks_and_manifests(settings: Settings, deployment: str) -> tuple[int, int, int]:
    """(chunks, their bytes, manifests of `deployment`) in the store."""
    async with open_store(settings.store) as store:
        chunks = [c async for c in store.list_chunks()]
        return len(chunks), sum(c.size for c in chunks), len(await store.list_manifests(deployment))


@pytest.mark.criu
async def test_freezer_killed_mid_upload_resumes_after_restart_with_no_half_catalog_entry(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    settings = s3_settings
    spec = sample_spec("killed", tmp_path)
    await put_spec(the_bus, spec)
    log_path = tmp_path / "freezer.log"
    async with (
        running_sandbox(settings, spec, f"r-{uuid.uuid4().hex[:6]}") as sb,
        checkpoint_events(the_bus, spec.name) as events,
    ):
        before = answer(sb)
        cmd = freeze_cmd(spec, sb.replica)
        # a store throttled to 3 requests/s makes the upload take ~20 s: time enough to kill it mid-way
        first = await start_freezer_process(settings, log_path, SNAPSCALE_STORE_RPS="3")
        try:
            await send(the_bus, settings.host_id, cmd)
            ledger = Ledger(settings.state_dir)
            deadline = time.monotonic() + 90
            while True:
                assert time.monotonic() < deadline, log_tail(log_path)
                attempt = ledger.attempt(cmd.id)
                if attempt is not None and attempt.phase.value == "dumped":
                    chunks, _, _ = await chunks_and_manifests(settings, spec.name)
                    if chunks >= 3:
                        break
                await asyncio.sleep(0.1)
        finally:
            first.kill()
            await first.wait()

        # killed mid-upload: some chunks, no manifest, no catalog entry; the complete image kept to resume
        chunks, present_bytes, manifests = await chunks_and_manifests(settings, spec.name)
        attempt = Ledger(settings.state_dir).attempt(cmd.id)
        assert attempt is not None and attempt.phase.value == "dumped"
        assert chunks >= 3 and manifests == 0
        assert (
            await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, attempt.compat_hash) is None
        )
        assert is_dir(attempt.staging_dir)
        assert events.empty()

        # restarted (throttled again), it takes the command back after its ack wait and resumes the
        # upload; a SIGTERM in the middle lets that freeze finish before the process exits
        second = await start_freezer_process(settings, log_path, SNAPSCALE_STORE_RPS="6")
        try:
            deadline = time.monotonic() + 60
            while (await chunks_and_manifests(settings, spec.name))[0] == chunks:
                assert time.monotonic() < deadline, log_tail(log_path)
                await asyncio.sleep(0.1)
        finally:
            second.terminate()
        ev = await next_event(events, 90)
        rc = await asyncio.wait_for(second.wait(), 60)
        assert rc == 0, log_tail(log_path)
        assert "stopped after 1 commands" in log_tail(log_path)

        assert ev.ok and not ev.skipped, ev.reason
        assert ev.command_id == cmd.id and ev.checkpoint_id == attempt.checkpoint_id  # resumed, not refrozen
        # what the killed run put up is reused: only the rest is new
        assert ev.sizes["new"] == ev.sizes["unique"] - present_bytes > 0
        found = await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash)
        assert found is not None and found[0].checkpoint_id == ev.checkpoint_id
        async with open_store(settings.store) as store:
            manifest = await fetch_manifest(store, found[0].manifest_key, settings.signing_key)
            assert (await verify_checkpoint(store, manifest, deep=True)).ok
        assert not is_dir(attempt.staging_dir)
        assert answer(sb) == before


async def test_released_weights_go_up_while_the_freeze_runs(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> None:
    """A workload that releases its weights: their chunks start up as soon as before_freeze names
    them (beside the dump), and the checkpoint is whole: manifest, image chunks and weights there."""
    import torch
    from safetensors.torch import save_file

    from examples.sample_server.model import PRESETS, random_state_dict

    weights = tmp_path / "tiny.safetensors"
    save_file(random_state_dict(PRESETS["tiny"], 0, torch.float32), str(weights))
    base = sample_spec("wfreeze", tmp_path)
    at = base.command.index("--weights") + 1
    spec = replace(
        base, command=[*base.command[:at], str(weights), *base.command[at + 1 :], "--weights-outside"]
    )
    async with freezing(settings, the_bus, criu, spec) as (sb, events):
        before = answer(sb)
        await send(the_bus, settings.host_id, freeze_cmd(spec, sb.replica))
        ev = await next_event(events)
        assert ev.ok and not ev.skipped, ev.reason
        assert "weights_upload_s" in ev.timings_s, ev.timings_s
        assert ev.sizes["weights"] > 600_000 and ev.sizes["new"] >= ev.sizes["weights"]
        found = await catalog.lookup_entry(the_bus.kv[Bucket.CHECKPOINTS], spec.name, ev.compat_hash)
        assert found is not None
        async with open_store(settings.store) as store:
            m = await fetch_manifest(store, found[0].manifest_key, settings.signing_key)
            assert m.weight_bytes == ev.sizes["weights"]
            report = await verify_checkpoint(store, m)  # every chunk there (not re-hashed: 0.2 GB)
            assert report.ok and report.chunks == len(m.digests()), report
        assert answer(sb) == before  # kept serving, its weights filled back from its file
