"""OCI sandboxes on real runc and CRIU: what a workload cannot do, its memory limit, and a container
frozen, scaled to zero and restored with its memory and writable layer, on this host and on
another (a second state dir: its own image store and run dirs, as a second host has)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from oci_image import CAN_DUMP_OTHER_UIDS, DUMP_USER, oci_ref, probe_spec

from snapscale.restorer.cleanup import owned_netns
from snapscale.shared.bus.sandbox_spec import Mount
from snapscale.shared.engine import is_running, netns, probe, runtime
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.errors import CriuError, EngineError, SandboxExited
from snapscale.shared.engine.lifecycle import Sandbox
from snapscale.shared.engine.oci import runc
from snapscale.shared.engine.oci.images import ImageStore

pytestmark = [
    pytest.mark.criu,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc and CRIU need root"),
    pytest.mark.skipif(
        not shutil.which("runc") or not shutil.which("umoci"), reason="runc/umoci not installed"
    ),
]
__all__ = ["oci_ref"]  # fixtures


@pytest.fixture
async def made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[Sandbox]]:
    monkeypatch.setenv("SNAPSCALE_STATE_DIR", str(tmp_path / "host-a"))
    monkeypatch.delenv("SNAPSCALE_SANDBOX")  # not development mode: an image is what runs
    monkeypatch.setenv("SNAPSCALE_SANDBOX_MOUNTS", "/usr")  # the probe's interpreter
    sbs: list[Sandbox] = []
    yield sbs
    for sb in sbs:
        await engine.stop(sb)


def _read(p: Path) -> str:
    return p.read_text()


def _exists(p: str) -> bool:
    return os.path.exists(p)


def _mounted(p: Path) -> bool:
    return os.path.ismount(p)


def _volatile(mount_point: Path) -> bool:
    """Whether /proc/self/mountinfo says the overlay at `mount_point` skips syncs (`volatile`,
    shown as `fsync=volatile` since Linux 6.x)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mount_point):
            return bool({"volatile", "fsync=volatile"} & set(fields[-1].split(",")))
    raise AssertionError(f"{mount_point} is not mounted")


async def _call(sb: Sandbox, method: str, path: str, body: object = None) -> object:
    data = b"" if body is None else json.dumps(body).encode()
    status, out = await probe.http_request(method, sb.endpoint, path, timeout_s=10, body=data)
    assert status == 200, out
    return json.loads(out)


async def test_a_workload_cannot_reach_past_its_root_mounts_and_limits(
    oci_ref: str, made: list[Sandbox], tmp_path: Path, criu: CriuBinary
) -> None:
    spec = probe_spec("contained", oci_ref)
    run_dir = tmp_path / "host-a" / "run" / "c1"
    sb = await engine.launch(spec, "contained-1", gpu_uuids=[], run_dir=run_dir)
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    state, cache, code = str(tmp_path / "host-a"), str(tmp_path / "cache"), str(Path(__file__).parents[1])
    (tmp_path / "cache").mkdir()
    got = await _call(sb, "POST", "/probe", {"paths": [state, cache, code, "/root", "/run/netns"]})
    assert isinstance(got, dict)
    assert (got["uid"], got["gid"]) == (1000, 1000)
    assert got["shadow"] == "refused: FileNotFoundError"  # the image's /etc, not the host's
    assert await _call(sb, "POST", "/read", {"path": "/etc/passwd"}) == (
        "ok: root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n"
    )
    assert got["write_usr"].startswith("refused")  # a read-only mount of the host's /usr
    assert got["write_root"] == "refused: PermissionError"
    assert got["write_scratch"] == "ok: /scratch/probe"
    assert got["mount"] == "refused"
    assert got["caps"] == "0000000000000000"
    for p in (state, cache, code, "/root", "/run/netns"):
        assert got[f"see:{p}"] == "refused: FileNotFoundError", p
    assert not _exists("/usr/snapscale-probe")
    # What it writes lands in its own upper layer only.
    await _call(sb, "POST", "/write", {"path": "/data/mine", "data": "tenant"})
    assert _read(run_dir / "upper" / "data" / "mine") == "tenant"
    assert not _exists("/data/mine")
    if not CAN_DUMP_OTHER_UIDS:  # a freeze says why it cannot, and the replica keeps serving
        with pytest.raises(CriuError, match="lacks CAP_SYS_RESOURCE"):
            await engine.freeze(sb, spec, tmp_path / "img", keep_running=True, criu=criu)
        assert await _call(sb, "GET", "/count") == 1


async def test_over_its_memory_limit_only_the_workload_dies_and_says_why(
    oci_ref: str, made: list[Sandbox], tmp_path: Path
) -> None:
    other = await engine.launch(
        probe_spec("bystander", oci_ref), "bystander-1", gpu_uuids=[], run_dir=tmp_path / "b"
    )
    made.append(other)
    await engine.wait_ready(other, probe_spec("bystander", oci_ref).ready)
    hog = probe_spec("hog", oci_ref, memory_mib=64, env={"ALLOC_MIB": "200"})
    sb = await engine.launch(hog, "hog-1", gpu_uuids=[], run_dir=tmp_path / "h")
    made.append(sb)
    with pytest.raises(SandboxExited, match="out of memory: limit 64 MiB"):
        await engine.wait_ready(sb, hog.ready)
    assert await _call(other, "GET", "/count") == 1


async def test_a_container_is_frozen_scaled_to_zero_and_restored_here_and_on_another_host(
    oci_ref: str, made: list[Sandbox], tmp_path: Path, criu: CriuBinary, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = probe_spec("frozen", oci_ref, user=DUMP_USER)
    first_run = tmp_path / "host-a" / "run" / "f1"
    sb = await engine.launch(spec, "frozen-1", gpu_uuids=[], run_dir=first_run)
    made.append(sb)
    # Its writable layer is the replica's alone and travels as a tar: the overlay never syncs the
    # host's disk (an unmount after a freeze would write back the whole image CRIU just wrote).
    assert _volatile(first_run / "bundle" / "rootfs")
    await engine.wait_ready(sb, spec.ready)
    for n in (1, 2, 3):
        assert await _call(sb, "GET", "/count") == n
    await _call(sb, "POST", "/write", {"path": "/data/kept", "data": "from the first replica"})
    await _call(sb, "POST", "/write", {"path": "/scratch/kept", "data": "scratch too"})
    # An auto-freeze keeps it serving (runc checkpoint --leave-running), and it can be frozen again.
    live = await engine.freeze(sb, spec, tmp_path / "image-live", keep_running=True, criu=criu)
    assert live.keep_running and await _call(sb, "GET", "/count") == 4
    image_dir = tmp_path / "image"
    rep = await engine.freeze(sb, spec, image_dir, keep_running=False, criu=criu)
    assert not rep.keep_running and not is_running(sb) and "stop" in rep.timings_s
    assert (image_dir / "rootfs-upper.tar").is_file()  # the writable layer travels in the image
    shutil.rmtree(first_run)  # scaled to zero: nothing of the first replica is left
    for host, replica in (("host-a", "frozen-2"), ("host-b", "frozen-3")):
        monkeypatch.setenv("SNAPSCALE_STATE_DIR", str(tmp_path / host))  # host-b: an empty image store
        copy = tmp_path / f"image-{replica}"  # what the chunk store would assemble there
        shutil.copytree(image_dir, copy, symlinks=True)
        back, _report = await engine.restore(
            spec, copy, replica, gpu_uuids=[], run_dir=tmp_path / host / "run" / replica, criu=criu
        )
        made.append(back)
        assert back.netns != sb.netns and back.container == replica
        assert _volatile(tmp_path / host / "run" / replica / "bundle" / "rootfs")
        assert await _call(back, "GET", "/count") == 5, host
        assert await _call(back, "POST", "/read", {"path": "/data/kept"}) == "ok: from the first replica"
        assert await _call(back, "POST", "/read", {"path": "/scratch/kept"}) == "ok: scratch too"
        await engine.stop(back)


async def test_a_restored_container_stays_in_its_cgroup_and_is_held_to_its_memory_limit(
    oci_ref: str, made: list[Sandbox], tmp_path: Path, criu: CriuBinary
) -> None:
    """CRIU leaves the restored tree in the cgroup runc made and joined it to (the bundle's CRIU
    config says `manage-cgroups=ignore`: no cgroup yard of CRIU's own, 2-24 ms of each restore on
    this cgroup v1 VM); the memory limit holds after the restore as before the freeze."""
    spec = probe_spec("held", oci_ref, user=DUMP_USER, memory_mib=64)
    sb = await engine.launch(spec, "held-1", gpu_uuids=[], run_dir=tmp_path / "host-a" / "run" / "h1")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    await engine.freeze(sb, spec, tmp_path / "image", keep_running=False, criu=criu)
    run_dir = tmp_path / "host-a" / "run" / "h2"
    back, _report = await engine.restore(
        spec, tmp_path / "image", "held-2", gpu_uuids=[], run_dir=run_dir, criu=criu
    )
    made.append(back)
    assert "/snapscale/held-2" in _read(Path(f"/proc/{back.pid}/cgroup"))
    assert "cgyard" not in "".join(_read(p) for p in run_dir.glob("criu-restore-*/restore.log"))
    assert await _call(back, "POST", "/alloc", {"mib": 8}) == 8
    with pytest.raises((ConnectionError, OSError, ValueError)):  # killed mid-answer
        await _call(back, "POST", "/alloc", {"mib": 200})
    for _ in range(100):
        if not is_running(back):
            break
        await asyncio.sleep(0.05)
    assert runtime.exit_reason(back) == "out of memory: limit 64 MiB"


async def test_a_file_growing_through_a_keep_running_freeze_travels_as_the_memory_saw_it(
    oci_ref: str, made: list[Sandbox], tmp_path: Path, criu: CriuBinary
) -> None:
    """The writable layer is packed while the container is still frozen: a file the workload holds
    open and appends a numbered line to every millisecond travels as the frozen memory knew it.
    Packed after the workload was thawed, the layer held lines the original wrote after the dump,
    and the restored replica, counting from its memory, wrote those numbers again."""
    spec = probe_spec("growing", oci_ref, user=DUMP_USER)
    sb = await engine.launch(spec, "growing-1", gpu_uuids=[], run_dir=tmp_path / "host-a" / "run" / "g1")
    made.append(sb)
    await engine.wait_ready(sb, spec.ready)
    await _call(sb, "POST", "/append", {"path": "/data/growing"})
    await _call(sb, "POST", "/read", {"path": "/data/growing"})
    image_dir = tmp_path / "image"
    live = await engine.freeze(sb, spec, image_dir, keep_running=True, criu=criu)
    assert live.keep_running and is_running(sb)
    await engine.stop(sb)
    back, _report = await engine.restore(
        spec, image_dir, "growing-2", gpu_uuids=[], run_dir=tmp_path / "host-a" / "run" / "g2", criu=criu
    )
    made.append(back)
    await asyncio.sleep(0.1)  # the restored thread appends on
    text = await _call(back, "POST", "/read", {"path": "/data/growing"})
    assert isinstance(text, str) and text.startswith("ok: 1\n")
    numbers = [int(n) for n in text.removeprefix("ok: ").split()]
    assert numbers == list(range(1, len(numbers) + 1)), "a line number written twice"
    assert len(numbers) > 50


async def test_a_mount_outside_what_the_host_allows_is_refused_before_anything_runs(
    oci_ref: str, made: list[Sandbox], tmp_path: Path
) -> None:
    spec = probe_spec("peeker", oci_ref)
    peek = replace(
        spec, sandbox=replace(spec.sandbox, mounts=[*spec.sandbox.mounts, Mount("/etc", "/host-etc")])
    )
    with pytest.raises(EngineError, match=r"sandbox.mounts\[1\].src /etc is outside"):
        made.append(await engine.launch(peek, "peeker-1", gpu_uuids=[], run_dir=tmp_path / "p"))
    assert not _exists("/run/snapscale-runc/peeker-1")


async def test_a_restore_whose_root_fails_while_its_netns_is_made_leaves_neither(
    oci_ref: str, made: list[Sandbox], tmp_path: Path
) -> None:
    """A restore makes the container's root while its netns is being made: when the root fails
    (here a mount the host does not allow), the netns made beside it is removed too."""
    spec = probe_spec("unmade", oci_ref)
    bad = replace(
        spec, sandbox=replace(spec.sandbox, mounts=[*spec.sandbox.mounts, Mount("/etc", "/host-etc")])
    )
    run_dir = tmp_path / "host-a" / "run" / "u1"
    with pytest.raises(EngineError, match=r"sandbox.mounts\[1\].src /etc is outside"):
        await runtime.prepare_restore(bad, tmp_path / "image", "unmade-1", gpu_uuids=[], run_dir=run_dir)
    assert owned_netns(tmp_path, keep=set()) == []
    ok = await runtime.prepare_restore(spec, tmp_path / "image", "unmade-2", gpu_uuids=[], run_dir=run_dir)
    assert owned_netns(tmp_path, keep=set()) == [ok.ns.name] and _mounted(run_dir / "bundle" / "rootfs")
    await runtime.discard(ok, run_dir)
    await netns.delete_netns(ok.ns.name)
    assert not _mounted(run_dir / "bundle" / "rootfs")


async def test_the_image_store_fetches_once_by_digest_and_refuses_a_wrong_one(
    oci_ref: str, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "images")
    first = await store.ensure(oci_ref)
    assert first.digest == oci_ref.rsplit("@", 1)[1]
    assert (first.rootfs / "app" / "probe.py").is_file() and (first.rootfs / "etc" / "passwd").is_file()
    marker = first.rootfs / "etc" / "from-the-store"
    marker.write_text("kept")  # a second ensure must not copy or unpack again
    assert (await store.ensure(oci_ref)).rootfs == first.rootfs and marker.exists()
    layout = oci_ref.removeprefix("oci:").rsplit("@", 1)[0]
    archive = tmp_path / "probe.tar"
    await runc.tool(
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        f"oci:{layout}:app",
        f"docker-archive:{archive}",
        step="t",
    )
    from_archive = await store.ensure(f"docker-archive:{archive}")
    assert (from_archive.rootfs / "app" / "probe.py").read_text() == (
        first.rootfs / "app" / "probe.py"
    ).read_text()
    wrong = f"oci:{layout}@sha256:{'0' * 64}"
    with pytest.raises(EngineError, match="the layout holds no manifest"):
        await ImageStore(tmp_path / "other").ensure(wrong)
    assert sorted(p.name for p in (tmp_path / "images").iterdir() if not p.name.startswith(".")) == sorted(
        {first.digest.removeprefix("sha256:"), from_archive.digest.removeprefix("sha256:")}
    )
