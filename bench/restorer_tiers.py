"""Time to ready by tier, through the restorer service: cold boot, restore after a prefetch from
S3, restore from the host cache, resume from suspend, for the CPU sample sandbox.

A nats-server and moto's S3 server run on loopback; the restorer runs in-process. Needs root
and CRIU. Run: .venv/bin/python bench/restorer_tiers.py [--preset tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

from nats.aio.msg import Msg

from examples import sample_server
from snapscale.demo.procs import free_port, wait_port
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.service import Restorer
from snapscale.shared import bus, engine
from snapscale.shared.bus import catalog
from snapscale.shared.bus.catalog import CatalogEntry
from snapscale.shared.bus.messages import (
    ReleaseCommand,
    ReleaseMode,
    ReplicaEvent,
    ReplicaState,
    ScaleUpCommand,
    decode_message,
)
from snapscale.shared.bus.spec import DeploymentSpec, ReadySpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings, StoreSettings
from snapscale.shared.engine import compat
from snapscale.shared.engine.criu import find_criu
from snapscale.shared.store.backend import open_store
from snapscale.shared.store.checkpoint import upload_image

REPO = Path(__file__).resolve().parent.parent
KEY = b"bench-key"
BUCKET = "bench-restorer"


def sample(preset: str, work: Path) -> DeploymentSpec:
    return DeploymentSpec(
        name="bench",
        command=sample_server.command(preset, weights=work / "weights.pt"),
        cwd=str(REPO),
        ready=ReadySpec(http_path="/healthz", timeout_s=300.0),
    )


class Events:
    def __init__(self) -> None:
        self.seen: list[ReplicaEvent] = []
        self.arrived = asyncio.Event()

    async def on(self, m: Msg) -> None:
        self.seen.append(decode_message(m.data, ReplicaEvent))
        self.arrived.set()

    async def wait(self, replica: str, states: set[ReplicaState], after: int) -> ReplicaEvent:
        while True:
            for ev in self.seen[after:]:
                if ev.replica == replica and ev.state in states:
                    return ev
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 300)


async def checkpoint(s: Settings, b: bus.Bus, spec: DeploymentSpec, work: Path) -> None:
    criu = find_criu(s.criu_path)
    sb = await engine.launch(spec, "bench-src", gpu_uuids=[], run_dir=work / "src")
    try:
        await engine.wait_ready(sb, spec.ready)
        await engine.freeze(sb, spec, work / "img", keep_running=False, criu=criu)
    finally:
        await engine.stop(sb)
    key = compat.host_key(spec, criu=criu, gpu_count=0)
    async with open_store(s.store) as st:
        m, mkey, _ = await upload_image(
            st,
            work / "img",
            deployment=spec.name,
            checkpoint_id="ck-bench",
            compat=key.as_dict(),
            compat_hash=key.hash(),
            signing_key=KEY,
        )
    await catalog.publish_entry(
        b.kv[Bucket.CHECKPOINTS], CatalogEntry(spec.name, key.hash(), "ck-bench", mkey, time.time(), "bench")
    )
    print(f"checkpoint: image {m.total_bytes / 1e6:.1f} MB")


async def run(preset: str, rounds: int, work: Path, nats_url: str, s3: str) -> dict[str, list[float]]:
    s = Settings(nats_url=nats_url, namespace=f"bench{uuid.uuid4().hex[:6]}",
                 store=StoreSettings(url=f"s3://{BUCKET}/r", endpoint_url=s3), signing_key=KEY,
                 cache_dir=work / "cache", state_dir=work / "state", host_id="bench-host")  # fmt: skip
    b = await bus.open_bus(s, "bench")
    evs = Events()
    await b.nc.subscribe(b.subjects.evt_replica_all(), cb=evs.on)
    spec = sample(preset, work)
    await b.kv[Bucket.DEPLOYMENTS].put(spec.name, spec.to_json())
    out: dict[str, list[float]] = defaultdict(list)
    stop = asyncio.Event()
    svc = Restorer(s, RestorerConfig(host=s.host_id, cpu_slots=4, heartbeat_s=1.0))
    task = asyncio.create_task(svc.run(stop))
    await asyncio.wait_for(svc.ready.wait(), 60)

    async def up(replica: str) -> ReplicaEvent:
        n = len(evs.seen)
        cmd = ScaleUpCommand(
            id=uuid.uuid4().hex, deployment=spec.name, replica=replica, issued_at=time.time()
        )
        await bus.publish(b, b.subjects.cmd(Verb.SCALE_UP, s.host_id), cmd)
        ev = await evs.wait(replica, {ReplicaState.READY, ReplicaState.FAILED}, n)
        assert ev.state is ReplicaState.READY and ev.tier is not None, ev.reason
        out[ev.tier.value].append(ev.timings_s["total"])
        return ev

    async def down(replica: str, mode: ReleaseMode) -> None:
        n = len(evs.seen)
        cmd = ReleaseCommand(
            id=uuid.uuid4().hex, deployment=spec.name, replica=replica, issued_at=time.time(), mode=mode
        )
        await bus.publish(b, b.subjects.cmd(Verb.RELEASE, s.host_id), cmd)
        await evs.wait(replica, {ReplicaState.STOPPED, ReplicaState.SUSPENDED}, n)

    try:
        for i in range(rounds):
            await up(f"cold{i}")
            await down(f"cold{i}", ReleaseMode.STOP)
        await checkpoint(s, b, spec, work)
        for i in range(rounds):
            assert svc.host is not None
            cache = svc.host.tools.checkpoints.cache
            for d in cache.digests():  # an empty host cache: every chunk comes from S3
                cache.drop(d)
            await up(f"s3-{i}")
            await down(f"s3-{i}", ReleaseMode.STOP)
        for i in range(rounds):
            await up(f"cached{i}")
            await down(f"cached{i}", ReleaseMode.SUSPEND)
            await up(f"cached{i}")  # resume
            await down(f"cached{i}", ReleaseMode.STOP)
    finally:
        stop.set()
        await task
        await b.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny", help="sample server preset: none (no torch) or tiny")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-restorer-"))
    nats_port, s3_port = free_port(), free_port()
    nats = subprocess.Popen(
        [str(Path(sys.executable).parent / "nats-server"), "-a", "127.0.0.1", "-p", str(nats_port), "-js",
         "-sd", str(work / "js")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(nats_port)
        wait_port(s3_port)
        import boto3

        s3 = f"http://127.0.0.1:{s3_port}"
        boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        res = asyncio.run(run(args.preset, args.rounds, work, f"nats://127.0.0.1:{nats_port}", s3))
    finally:
        nats.terminate()
        moto.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, preset {args.preset}, {args.rounds} rounds, seconds")
    print(f"{'tier':16s} {'median':>8s} {'min':>8s} {'max':>8s}")
    for tier in ("cold", "store", "cache", "resume"):
        xs = res.get(tier, [])
        if xs:
            print(f"{tier:16s} {statistics.median(xs):8.3f} {min(xs):8.3f} {max(xs):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
