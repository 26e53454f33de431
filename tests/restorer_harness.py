"""A restorer under test: the real service on the real nats-server, store and CRIU, with helpers
to send it commands, follow its replica events and make checkpoints with the engine and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from conftest import settings_env
from engine_helpers import ROOT, sample_spec
from nats.aio.msg import Msg

from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.service import Restorer
from snapscale.shared import bus
from snapscale.shared.bus import catalog
from snapscale.shared.bus.catalog import CatalogEntry
from snapscale.shared.bus.messages import (
    ReleaseCommand,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
    ScaleUpCommand,
    Tier,
    decode_message,
)
from snapscale.shared.bus.spec import DeploymentSpec, ReadySpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import compat, probe
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.store.backend import open_store
from snapscale.shared.store.checkpoint import upload_image
from snapscale.shared.store.manifest import Manifest

FINAL = frozenset({ReplicaState.READY, ReplicaState.FAILED})


@dataclass
class Frozen:
    entry: CatalogEntry
    manifest: Manifest
    answer: bytes  # /generate of the replica before it was frozen
    timings: bytes  # /timings: a restored replica reports the frozen one's, a cold boot its own


@dataclass
class Harness:
    settings: Settings
    bus: bus.Bus
    criu: CriuBinary
    tag: str
    tmp: Path
    events: list[ReplicaEvent] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def host(self) -> str:
        return self.settings.host_id

    def spec(self, name: str = "sample", **kw: object) -> DeploymentSpec:
        return sample_spec(name, tag=self.tag, preset="none", **kw)  # type: ignore[arg-type]

    async def deploy(self, spec: DeploymentSpec) -> DeploymentSpec:
        await self.bus.kv[Bucket.DEPLOYMENTS].put(spec.name, spec.to_json())
        return spec

    async def restore(
        self,
        deployment: str,
        replica: str,
        *,
        deadline_s: float = 60.0,
        checkpoint_id: str | None = None,
        allow_tiers: list[Tier] | None = None,
        issued_at: float | None = None,
    ) -> ScaleUpCommand:
        cmd = ScaleUpCommand(
            id=f"r-{uuid.uuid4().hex[:10]}",
            deployment=deployment,
            replica=replica,
            issued_at=time.time() if issued_at is None else issued_at,
            deadline_s=deadline_s,
            checkpoint_id=checkpoint_id,
            allow_tiers=list(Tier) if allow_tiers is None else allow_tiers,
        )
        await self.send(Verb.SCALE_UP, cmd)
        return cmd

    async def release(self, deployment: str, replica: str, mode: ReleaseMode) -> ReleaseCommand:
        cmd = ReleaseCommand(
            id=f"x-{uuid.uuid4().hex[:10]}",
            deployment=deployment,
            replica=replica,
            issued_at=time.time(),
            mode=mode,
        )
        await self.send(Verb.RELEASE, cmd)
        return cmd

    async def send(self, verb: Verb, cmd: object, msg_id: str | None = None) -> None:
        await bus.publish(self.bus, self.bus.subjects.cmd(verb, self.host), cmd, msg_id=msg_id)

    async def wait(
        self,
        replica: str,
        states: frozenset[ReplicaState] = FINAL,
        timeout_s: float = 60.0,
        after: int = 0,
    ) -> ReplicaEvent:
        """The first event of `replica` in one of `states` (from the `after`-th event on)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for ev in self.events[after:]:
                if ev.replica == replica and ev.state in states:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [(e.replica, e.state.value, e.reason) for e in self.events]
                raise TimeoutError(f"no {sorted(states)} event for {replica} in {timeout_s}s; saw {seen}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def of(self, replica: str) -> list[ReplicaEvent]:
        return [e for e in self.events if e.replica == replica]

    async def make_checkpoint(
        self,
        spec: DeploymentSpec,
        *,
        store: Settings | None = None,
        key: compat.CompatKey | None = None,
        spoil_image: Callable[[Path], None] | None = None,
    ) -> Frozen:
        """Cold-boot `spec`, freeze it (stopping it), upload the image and put it in the catalog."""
        n = uuid.uuid4().hex[:8]
        sb = await engine.launch(spec, f"src-{n}", gpu_uuids=[], run_dir=self.tmp / f"src-{n}")
        try:
            # the sample server's own health URL, whatever the spec probes (a test may probe a file)
            await engine.wait_ready(sb, ReadySpec(http_path="/healthz", timeout_s=30.0))
            answer = await get(sb.endpoint, "/generate")
            timings = await get(sb.endpoint, "/timings")
            img = self.tmp / f"img-{n}"
            await engine.freeze(sb, spec, img, keep_running=False, criu=self.criu)
        finally:
            await engine.stop(sb)
        if spoil_image is not None:
            spoil_image(img)
        key = key or compat.host_key(spec, criu=self.criu, gpu_count=0)
        ckpt = f"ck-{n}"
        async with open_store((store or self.settings).store) as st:
            m, mkey, _rep = await upload_image(
                st,
                img,
                deployment=spec.name,
                checkpoint_id=ckpt,
                compat=key.as_dict(),
                compat_hash=key.hash(),
                signing_key=self.settings.signing_key,
            )
        entry = CatalogEntry(
            spec.name, key.hash(), ckpt, mkey, time.time(), host="test", sizes={"total": m.total_bytes}
        )
        await catalog.publish_entry(self.bus.kv[Bucket.CHECKPOINTS], entry)
        return Frozen(entry, m, answer, timings)


async def get(endpoint: str, path: str) -> bytes:
    status, body = await probe.http_request("GET", endpoint, path, timeout_s=10)
    assert status == 200, body
    return body


def answer_of(body: bytes) -> object:
    return orjson.loads(body)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, criu: CriuBinary, **config: object
) -> AsyncIterator[tuple[Restorer, asyncio.Task[None]]]:
    """The restorer service as an asyncio task, serving until the block ends."""
    cfg = RestorerConfig(host=settings.host_id, heartbeat_s=0.5, ack_wait_s=10.0, **config)  # type: ignore[arg-type]
    svc = Restorer(settings, cfg, criu=criu)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    ready = asyncio.create_task(svc.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what stopped it
    assert svc.ready.is_set(), "restorer did not start in 30s"
    try:
        yield svc, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        # stop whatever the service still runs (a test's replicas)
        if svc.host is not None:
            for lv in list(svc.host.replicas.live.values()):
                await engine.stop(lv.sandbox)


async def follow(h: Harness) -> AsyncIterator[None]:
    async def on(m: Msg) -> None:
        h.events.append(decode_message(m.data, ReplicaEvent))
        h._arrived.set()

    sub = await h.bus.nc.subscribe(h.bus.subjects.evt_replica_all(), cb=on)
    try:
        yield
    finally:
        await sub.unsubscribe()


def service_env(settings: Settings, criu: CriuBinary) -> dict[str, str]:
    """The environment a service process (`snapscale restorer`, `freezer`, `scaler`) reads its
    settings from, matching `settings`; none of this process's own SNAPSCALE_ variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSCALE_")}
    return {
        **env,
        **settings_env(settings),
        "SNAPSCALE_CRIU": criu.path,
        "SNAPSCALE_HEARTBEAT_S": "0.5",
        # dev mode where conftest sets it (host-process sandboxes); otherwise OCI, the default
        "SNAPSCALE_SANDBOX": os.environ.get("SNAPSCALE_SANDBOX", "oci"),
    }


def spawn(
    settings: Settings, criu: CriuBinary, log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`snapscale restorer` as its own process (so a test can SIGKILL it)."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "snapscale", "restorer", "--host", settings.host_id],
            env={**service_env(settings, criu), **(extra_env or {})},
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Service processes a test starts; any still running afterwards gets SIGTERM, then SIGKILL."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
