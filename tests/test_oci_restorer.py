"""The restorer service with OCI sandboxes: a container frozen on one host (its memory and writable
layer chunked into the store) is restored by another host's restorer, with its own state dir and
image store, and stopped on release (runc's container, cgroup and overlay gone); a spec without an
image is refused with the reason on a host outside development mode."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from oci_image import DUMP_USER, oci_ref, probe_spec
from restorer_harness import FINAL, Harness, follow, running

from snapscale.restorer.cleanup import reap
from snapscale.shared import bus
from snapscale.shared.bus import catalog
from snapscale.shared.bus.catalog import CatalogEntry
from snapscale.shared.bus.messages import ReleaseMode, ReplicaState, Tier
from snapscale.shared.bus.subjects import Bucket
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import compat, probe
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.netns import existing_netns
from snapscale.shared.engine.oci import runc
from snapscale.shared.store.backend import open_store
from snapscale.shared.store.checkpoint import upload_image

pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runc"), reason="runc needs root"),
]
__all__ = ["oci_ref"]  # fixtures


async def _call(endpoint: str, method: str, path: str, body: object = None) -> object:
    data = b"" if body is None else json.dumps(body).encode()
    status, out = await probe.http_request(method, endpoint, path, timeout_s=10, body=data)
    assert status == 200, out
    return json.loads(out)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A host outside development mode whose workloads may mount /usr (the probe's interpreter)."""
    monkeypatch.delenv("SNAPSCALE_SANDBOX")
    monkeypatch.setenv("SNAPSCALE_SANDBOX_MOUNTS", "/usr")
    return monkeypatch


_following = contextlib.asynccontextmanager(follow)  # the harness's event follower, as a block


def _cleared(replica: str, run_dirs: Path) -> bool:
    mounted = any(str(run_dirs) in line for line in Path("/proc/self/mounts").read_text().splitlines())
    return not mounted and not Path(runc.STATE_ROOT, replica).exists()


async def test_a_checkpoint_frozen_on_one_host_is_restored_by_another_hosts_restorer(
    oci_ref: str,
    settings: Settings,
    the_bus: bus.Bus,
    criu: CriuBinary,
    tmp_path: Path,
    host: pytest.MonkeyPatch,
) -> None:
    spec = probe_spec("oci-moved", oci_ref, user=DUMP_USER)
    # Host a: this process's engine, its own state dir (image store).
    host.setenv("SNAPSCALE_STATE_DIR", str(tmp_path / "host-a"))
    sb = await engine.launch(spec, "moved-src", gpu_uuids=[], run_dir=tmp_path / "host-a" / "src")
    try:
        await engine.wait_ready(sb, spec.ready)
        for _ in range(3):
            await _call(sb.endpoint, "GET", "/count")
        await _call(sb.endpoint, "POST", "/write", {"path": "/data/kept", "data": "host a wrote this"})
        await engine.freeze(sb, spec, tmp_path / "img", keep_running=False, criu=criu)
    finally:
        await engine.stop(sb)
    key = compat.host_key(spec, criu=criu, gpu_count=0)
    async with open_store(settings.store) as st:
        m, mkey, _ = await upload_image(
            st, tmp_path / "img", deployment=spec.name, checkpoint_id="ck-oci", compat=key.as_dict(),
            compat_hash=key.hash(), signing_key=settings.signing_key,
        )  # fmt: skip
    assert any(f.path == "rootfs-upper.tar" for f in m.files)  # the writable layer, chunked
    entry = CatalogEntry(spec.name, key.hash(), "ck-oci", mkey, time.time(), host="host-a", sizes={})
    await catalog.publish_entry(the_bus.kv[Bucket.CHECKPOINTS], entry)
    shutil.rmtree(tmp_path / "host-a")  # nothing of host a is left for b to lean on
    # Host b: the restorer service, with its own state dir and an empty image store.
    b = replace(settings, host_id="host-b", state_dir=tmp_path / "host-b", cache_dir=tmp_path / "cache-b")
    host.setenv("SNAPSCALE_STATE_DIR", str(b.state_dir))
    h = Harness(b, the_bus, criu, f"oci-{uuid.uuid4().hex[:8]}", tmp_path)
    await the_bus.kv[Bucket.DEPLOYMENTS].put(spec.name, spec.to_json())
    async with _following(h), running(b, criu):
        await h.restore(spec.name, "moved-1")
        ev = await h.wait("moved-1", FINAL)
        assert ev.state is ReplicaState.READY and ev.tier is Tier.STORE, ev
        assert await _call(ev.local_endpoint, "GET", "/count") == 4
        assert (
            await _call(ev.local_endpoint, "POST", "/read", {"path": "/data/kept"}) == "ok: host a wrote this"
        )
        await h.release(spec.name, "moved-1", ReleaseMode.STOP)
        assert (await h.wait("moved-1", frozenset({ReplicaState.STOPPED}))).state is ReplicaState.STOPPED
        assert _cleared("moved-1", b.state_dir)


async def test_a_spec_without_an_image_fails_with_the_reason_outside_development_mode(
    settings: Settings, the_bus: bus.Bus, criu: CriuBinary, tmp_path: Path, host: pytest.MonkeyPatch
) -> None:
    h = Harness(settings, the_bus, criu, f"oci-{uuid.uuid4().hex[:8]}", tmp_path)
    spec = await h.deploy(h.spec("hostproc"))
    async with _following(h), running(settings, criu):
        await h.restore(spec.name, "hostproc-1")
        ev = await h.wait("hostproc-1", FINAL)
    assert ev.state is ReplicaState.FAILED
    assert (
        "names no sandbox.image; host-process sandboxes run only on a host in development mode" in ev.reason
    )


async def test_a_ready_container_killed_over_its_memory_limit_is_reported_failed_with_the_reason(
    oci_ref: str,
    settings: Settings,
    the_bus: bus.Bus,
    criu: CriuBinary,
    tmp_path: Path,
    host: pytest.MonkeyPatch,
) -> None:
    """A replica ready for a while takes more memory than its limit: the kernel kills it inside its
    cgroup; the restorer reports it failed with the OOM reason (and frees what it held) while the
    replica beside it and the restorer carry on."""
    host.setenv("SNAPSCALE_STATE_DIR", str(settings.state_dir))
    h = Harness(settings, the_bus, criu, f"oci-{uuid.uuid4().hex[:8]}", tmp_path)
    hog = await h.deploy(probe_spec(f"late-hog-{h.tag}", oci_ref, memory_mib=64))
    other = await h.deploy(probe_spec(f"bystander-{h.tag}", oci_ref))
    async with _following(h), running(settings, criu, cpu_slots=2) as (svc, _task):
        await h.restore(hog.name, "hog-1")
        await h.restore(other.name, "by-1")
        ready = [await h.wait(r, FINAL) for r in ("hog-1", "by-1")]
        assert [e.state for e in ready] == [ReplicaState.READY] * 2, ready
        assert await _call(ready[0].local_endpoint, "POST", "/alloc", {"mib": 8}) == 8  # under its limit
        with pytest.raises((ConnectionError, OSError, ValueError)):  # killed mid-answer
            await _call(ready[0].local_endpoint, "POST", "/alloc", {"mib": 200})
        ev = await h.wait("hog-1", frozenset({ReplicaState.FAILED}), timeout_s=10)
        assert ev.reason == "the sandbox died while ready: out of memory: limit 64 MiB", ev.reason
        assert svc.host is not None and "hog-1" not in svc.host.replicas.live
        runs = settings.state_dir / "restorer" / "run"
        assert _cleared("hog-1", runs / "hog-1.")  # its container, cgroup and overlay are gone
        assert await _call(ready[1].local_endpoint, "GET", "/count") == 1  # the bystander serves on
        await h.restore(hog.name, "hog-2")  # and the restorer too, in the slot the dead one freed
        assert (await h.wait("hog-2", FINAL)).state is ReplicaState.READY


async def test_what_a_crash_left_of_a_container_is_reaped(
    oci_ref: str, tmp_path: Path, host: pytest.MonkeyPatch
) -> None:
    """The restorer's reap after a cut-short start: the tree, its netns, runc's state, the overlay."""
    host.setenv("SNAPSCALE_STATE_DIR", str(tmp_path / "state"))
    spec = probe_spec("crashed", oci_ref)
    run_dir = tmp_path / "run" / "crashed-1"
    sb = await engine.launch(spec, "crashed-1", gpu_uuids=[], run_dir=run_dir)
    try:
        await engine.wait_ready(sb, spec.ready)
        assert not _cleared("crashed-1", run_dir)  # mounted and known to runc until reaped
        killed = await reap(run_dir)  # as the restorer does when it finds a half-done start
        assert sb.pid in killed
        assert _cleared("crashed-1", run_dir)
        assert sb.netns not in {ns.name for ns in existing_netns()}
    finally:
        await engine.stop(sb)
