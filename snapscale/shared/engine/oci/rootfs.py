"""A replica's root and bundle: the image from the host's store under an overlay whose upper layer
is the replica's own (a restore's unpacked from the checkpoint's `rootfs-upper.tar`), the GPUs it
may use, then `config.json` and CRIU's `criu.conf` beside it.

The root (`prepare`) needs nothing of the replica's network namespace, so a restore prepares it
while the namespace is being made (runtime.py); the bundle (`write_bundle`) takes the namespace's
path once it exists. Before, the whole bundle was made on the restore's critical path, inside
`runc restore`'s time: the image lookup, the writable layer's unpack, the overlay mount and, for a
GPU replica, NVML's init and `ldconfig -p` (now read once per process: gpu.HostListing).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.core.settings import DEFAULT_STATE_DIR
from snapscale.shared.engine import mountinfo
from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.oci import runc
from snapscale.shared.engine.oci.config import CRIU_OPTIONS, runtime_config, submounts
from snapscale.shared.engine.oci.gpu import GpuAccess, HostListing
from snapscale.shared.engine.oci.images import ImageStore
from snapscale.shared.engine.sandbox import workload_env

UPPER_TAR = "rootfs-upper.tar"  # the writable layer, in the image dir
CGROUP_PARENT = "/snapscale"
MOUNTS_ENV = "SNAPSCALE_SANDBOX_MOUNTS"
HOST_GPUS = HostListing()  # this process's reading of the host's GPUs


@dataclass(frozen=True)
class Root:
    """A replica's prepared root: the overlay mounted at `rootfs`, what its config needs of the host."""

    bundle: Path
    rootfs: Path
    gpu: GpuAccess | None
    below: dict[str, list[str]] = field(default_factory=dict)  # each declared mount's submounts


def image_store() -> ImageStore:
    """The host's image store, beside the sandbox registry in the state dir."""
    return ImageStore(Path(os.environ.get("SNAPSCALE_STATE_DIR", DEFAULT_STATE_DIR)) / "images")


def allowed_mount_roots() -> list[str]:
    """The host directories whose contents specs may mount read-only (`SNAPSCALE_SANDBOX_MOUNTS`,
    colon-separated; none by default): a spec comes over the bus, the host decides what it shows."""
    return [p.rstrip("/") or "/" for p in os.environ.get(MOUNTS_ENV, "").split(":") if p]


def check_mounts(spec: DeploymentSpec, roots: list[str]) -> None:
    """Every `sandbox.mounts` source lies under one of `roots`, else the launch is refused. Pure."""
    for i, m in enumerate(spec.sandbox.mounts):
        if not any(r == "/" or m.src == r or m.src.startswith(f"{r}/") for r in roots):
            raise EngineError(
                "launch",
                f"sandbox.mounts[{i}].src {m.src} is outside the host paths this host lets workloads "
                f"read ({MOUNTS_ENV}={':'.join(roots) or '<none>'}); see docs/sandbox.md",
            )


class _Volatile:
    """Whether this host's overlayfs takes `volatile` (Linux 5.10+), learnt at the first mount."""

    ok = True


async def mount_overlay(rootfs: Path, *, lower: Path, upper: Path, work: Path) -> None:
    """The replica's root: `lower` (the image, shared) under its own `upper`, mounted `volatile`:
    the overlay neither syncs its upper filesystem nor honours the workload's fsync. The writable
    layer is the replica's alone and reaches a checkpoint as a tar (`layer`), never from the disk
    after a crash, so durability buys nothing; and without `volatile` the unmount after a freeze
    syncs the whole upper filesystem, the image CRIU has just written to it included (~1 s of a
    freeze of the CPU sample, more for a GPU image, measured with bench.oci_sandbox)."""
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if _Volatile.ok:
        try:
            volatile = f"{opts},volatile"
            await runc.tool("mount", "-t", "overlay", "overlay", "-o", volatile, str(rootfs), step="rootfs")
            return
        except EngineError:  # an older kernel: mounted as before
            _Volatile.ok = False
    await runc.tool("mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs), step="rootfs")


def cgroups_path(replica: str) -> str:
    return f"{CGROUP_PARENT}/{replica}"


def mkdirs(*dirs: Path) -> bool:
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return True


def _exists(p: Path) -> bool:
    return p.exists()


async def layer(upper: Path, tar: Path, *, pack: bool, step: str) -> None:
    """The writable layer to (`pack`) or from a tar, overlay whiteouts and xattrs included."""
    mode = ["-cf", str(tar), "."] if pack else ["-xpf", str(tar)]
    await runc.tool(
        "tar", "-C", str(upper), "--xattrs", "--xattrs-include=*", "--numeric-owner", *mode, step=step
    )


async def prepare(spec: DeploymentSpec, run_dir: Path, gpu_uuids: list[str], upper_tar: Path | None) -> Root:
    """The image (fetched and unpacked once per host), the writable layer (from `upper_tar` when it
    exists), the overlay, the GPUs' devices and libraries. Undo with `runtime`'s teardown."""
    assert spec.sandbox.image is not None
    check_mounts(spec, allowed_mount_roots())
    image = await image_store().ensure(spec.sandbox.image)
    upper, work, bundle = run_dir / "upper", run_dir / "work", run_dir / "bundle"
    rootfs = bundle / "rootfs"
    if mkdirs(upper, work, rootfs) and upper_tar is not None and _exists(upper_tar):
        await layer(upper, upper_tar, pack=False, step="rootfs")
    await mount_overlay(rootfs, lower=image.rootfs, upper=upper, work=work)
    try:
        gpu = await HOST_GPUS.access(gpu_uuids) if gpu_uuids else None
    except ValueError as e:
        raise EngineError("launch", f"GPUs for the container: {e}") from None
    below = submounts(await asyncio.to_thread(mountinfo.SELF.read_text), [m.src for m in spec.sandbox.mounts])
    return Root(bundle=bundle, rootfs=rootfs, gpu=gpu, below=below)


def write_bundle(spec: DeploymentSpec, replica: str, root: Root, ns_path: Path, gpu_uuids: list[str]) -> Path:
    """`config.json` and `criu.conf` for `replica` in the netns at `ns_path`; the bundle dir."""
    config = runtime_config(
        spec,
        rootfs=str(root.rootfs),
        netns_path=str(ns_path),
        env=workload_env(spec, gpu_uuids),
        cgroups_path=cgroups_path(replica),
        hostname=replica,
        gpu=root.gpu,
        criu_config=str(root.bundle / "criu.conf"),
        below=root.below,
    )
    (root.bundle / "criu.conf").write_text(CRIU_OPTIONS)
    (root.bundle / "config.json").write_text(json.dumps(config, indent=1))
    return root.bundle
