"""Every reason a restore cannot be used ends ready by a cold boot that says why: a checkpoint
under another key, a corrupted chunk in S3, a tampered manifest, S3 unreachable, a CRIU restore
that fails, a restored replica that never gets ready. Real nats-server, moto S3 and CRIU."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from conftest import S3Server
from engine_helpers import kill_tagged
from restorer_harness import Frozen, Harness, follow, running

from snapscale.demo.procs import free_port
from snapscale.shared import bus
from snapscale.shared.bus.messages import GpuInfo, ReplicaState, Tier
from snapscale.shared.bus.spec import ReadySpec
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import compat
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import CriuBinary

pytestmark = pytest.mark.criu


@pytest.fixture
async def h(
    s3_settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path
) -> AsyncIterator[Harness]:
    tag = f"rfall-{uuid.uuid4().hex[:10]}"
    harness = Harness(s3_settings, the_bus, criu, tag, tmp_path)
    async for _ in follow(harness):
        yield harness
    kill_tagged(tag)


async def cold_with_reason(h: Harness, settings: Settings, deployment: str, *reason_parts: str) -> None:
    """A restore through the service ends ready by cold boot, its reason naming every part."""
    async with running(settings, h.criu):
        await h.restore(deployment, "r1")
        ev = await h.wait("r1")
    assert ev.state is ReplicaState.READY, ev.reason
    assert ev.tier is Tier.COLD
    for part in reason_parts:
        assert part in ev.reason, ev.reason
    await_states = [e.state for e in h.of("r1")]
    assert await_states[-1] is ReplicaState.READY
    assert ReplicaState.STARTING in await_states


def s3(server: S3Server) -> Any:
    return boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1")


async def test_checkpoint_under_another_key(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    mine = compat.host_key(spec, criu=h.criu, gpu_count=0)
    theirs = replace(mine, criu_version="4.1.1", kernel_release="6.1.0")
    frozen = await h.make_checkpoint(spec, key=theirs)
    await cold_with_reason(
        h,
        h.settings,
        spec.name,
        f"no checkpoint for key {mine.hash()[:12]}",
        f"compat mismatch with checkpoint {frozen.entry.checkpoint_id}: criu_version, kernel_release",
    )


async def test_corrupted_chunk_in_s3(h: Harness, s3_server: S3Server) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    digest = sorted(frozen.manifest.digests())[0]
    s3(s3_server).put_object(
        Bucket=s3_server.bucket, Key=f"{h.settings.store.prefix}/chunks/{digest}", Body=b"not the chunk"
    )
    await cold_with_reason(
        h, h.settings, spec.name, f"restore of {frozen.entry.checkpoint_id} failed", digest[:16], "corrupt"
    )


async def test_tampered_manifest(h: Harness, s3_server: S3Server) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec)
    client = s3(s3_server)
    key = f"{h.settings.store.prefix}/{frozen.entry.manifest_key}"
    doc = orjson.loads(client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    doc["manifest"]["files"][0]["mode"] ^= 0o4000  # setuid on an image file, signature left as it was
    tampered = orjson.dumps(doc)
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=tampered)
    await cold_with_reason(
        h, h.settings, spec.name, f"checkpoint {frozen.entry.checkpoint_id}: manifest refused", "signature"
    )


async def test_s3_unreachable(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    await h.make_checkpoint(spec)
    dead = replace(h.settings.store, endpoint_url=f"http://127.0.0.1:{free_port()}")
    unreachable = replace(h.settings, store=dead)
    await cold_with_reason(h, unreachable, spec.name, "store unreachable")


def _spoil(img: Path) -> None:
    """CRIU's image of the init's core, cut in half: the manifest is fine, the restore is not."""
    for core in img.glob("core-*.img"):
        data = core.read_bytes()
        core.write_bytes(data[: len(data) // 2])


async def test_criu_restore_fails(h: Harness) -> None:
    spec = await h.deploy(h.spec())
    frozen = await h.make_checkpoint(spec, spoil_image=_spoil)
    await cold_with_reason(
        h,
        h.settings,
        spec.name,
        f"restore of {frozen.entry.checkpoint_id} failed: criu_restore",
        "core-1.img",
    )


async def test_restored_replica_never_ready(h: Harness) -> None:
    # the probe is part of the spec (and its hash): freeze a replica whose ready file appears once
    # the sandbox has started, then delete the file so the restored one never reports ready
    flag = h.tmp / "ready-flag"
    spec = h.spec(ready=ReadySpec(http_path=None, file=str(flag), timeout_s=2.0, interval_s=0.05))
    spec = replace(spec, command=["sh", "-c", f'touch {flag}; exec "$0" "$@"', *spec.command])
    await h.deploy(spec)
    frozen: Frozen = await h.make_checkpoint(spec)
    flag.unlink()
    # the restored tree has already run its `touch`: it waits for a file that never comes; the cold
    # boot runs it again and gets ready
    await cold_with_reason(
        h, h.settings, spec.name, f"restore of {frozen.entry.checkpoint_id} failed: ready: not ready after 2s"
    )


def _as_if_frozen_on_a_gpu(img: Path) -> None:
    """The engine's record of the image says it holds CUDA state, as a GPU sandbox's would."""
    meta = img / engine.META_NAME
    doc = json.loads(meta.read_text())
    doc.update(cuda=True, gpu_uuids=["GPU-frozen-on"])
    meta.write_text(json.dumps(doc))


async def test_cuda_restore_fails(h: Harness) -> None:
    # a GPU deployment on a host whose GPU is listed but has no CUDA driver behind it: the CUDA
    # step of the restore fails (for real, libcuda is absent here) and a cold boot takes over
    spec = await h.deploy(replace(h.spec(), gpus=1))
    key = compat.host_key(spec, criu=h.criu, gpu_count=1)
    frozen = await h.make_checkpoint(spec, key=key, spoil_image=_as_if_frozen_on_a_gpu)
    async with running(h.settings, h.criu) as (svc, _):
        assert svc.host is not None
        svc.host.tools.slots.gpus.append(GpuInfo(0, "GPU-here", "test-gpu", 1 << 30))
        await h.restore(spec.name, "r1")
        ev = await h.wait("r1")
        assert ev.state is ReplicaState.READY and ev.tier is Tier.COLD, ev.reason
        assert f"restore of {frozen.entry.checkpoint_id} failed: cuda: no CUDA" in ev.reason, ev.reason
        assert ev.gpu_uuids == ["GPU-here"]  # the cold boot got the GPU the restore had reserved
        assert svc.host.tools.slots.free_gpus() == []
