"""The sandbox seams the fidelity matrix runs on (the module fixture's parameter): the same workload
(workload.py) as a host-process sandbox (`host`, development mode) and as an OCI container run by
runc (`oci`, the default sandbox: workload.py in a small image built here, the host's /usr mounted
read-only for its interpreter). Each seam gives the spec, the environment the engine and the
services run in, and where a replica's files (its log, its mapped file) lie on the host."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from oci_image import DUMP_USER

from bench import oci_image as bench_image
from snapscale.shared.bus.sandbox_spec import Mount, SandboxSpec
from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec
from snapscale.shared.engine.sandbox import Sandbox

WORKLOAD = Path(__file__).with_name("workload.py")
OCI_FILES = "/data"  # the workload's files in its container: the writable layer


def _env(files: str, ext_port: int, shm: str) -> dict[str, str]:
    return {
        "FIDELITY_DIR": files,
        "FIDELITY_EXT_PORT": str(ext_port),
        "FIDELITY_MARK": "m-42",
        "FIDELITY_SHM": shm,
    }


def fidelity_spec(name: str, files: Path, ext_port: int, shm: Path) -> DeploymentSpec:
    """The host-process sandbox's spec: this interpreter, files in a host dir, the host's /dev/shm."""
    return DeploymentSpec(
        name=name,
        command=[sys.executable, str(WORKLOAD)],
        cwd=str(files),
        env=_env(str(files), ext_port, str(shm)),
        hooks=HooksSpec(),
        ready=ReadySpec(http_path="/healthz", timeout_s=30.0, interval_s=0.05),
    )


def oci_spec(name: str, image: str, ext_port: int) -> DeploymentSpec:
    """The container's spec: files in its writable layer, the container's own /dev/shm."""
    return DeploymentSpec(
        name=name,
        command=["/usr/bin/python3", "-I", "/app/workload.py"],
        cwd=OCI_FILES,
        env=_env(OCI_FILES, ext_port, "/dev/shm/fidelity"),
        hooks=HooksSpec(),
        sandbox=SandboxSpec(
            image=image, user=DUMP_USER, memory_mib=256, pids=128, cpus=1.0,
            mounts=[Mount(src="/usr", dst="/usr")],
        ),
        ready=ReadySpec(http_path="/healthz", timeout_s=30.0, interval_s=0.05),
    )  # fmt: skip


@dataclass(frozen=True)
class Seam:
    name: str
    spec: DeploymentSpec
    files_of: Callable[[Sandbox], Path]  # a replica's FIDELITY_DIR, seen from the host
    env: dict[str, str | None]  # the engine's and the services' environment (None: unset)


def seam(name: str, tmp: Path, ext_port: int, shm: Path) -> Seam:
    """The seam `name` for a matrix run under `tmp` (the services' state dir: `tmp / "state"`)."""
    if name == "host":
        files = tmp / "files"
        files.mkdir()
        return Seam(name, fidelity_spec("fidelity", files, ext_port, shm), lambda _sb: files, {})
    if not shutil.which("runc") or not shutil.which("umoci"):
        pytest.skip("runc/umoci not installed")
    image = bench_image.build_layout(tmp / "image", {"workload.py": WORKLOAD.read_text()})
    return Seam(
        name,
        oci_spec("fidelity", image, ext_port),
        lambda sb: Path(sb.run_dir) / "upper" / OCI_FILES.lstrip("/"),
        {
            "SNAPSCALE_SANDBOX": None,  # not development mode: the image is what runs
            "SNAPSCALE_SANDBOX_MOUNTS": "/usr",  # the workload's interpreter
            "SNAPSCALE_STATE_DIR": str(tmp / "state"),  # the image store, as the services' settings
        },
    )


NAMES = ("host", "oci")


@contextlib.contextmanager
def environment(s: Seam) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s.env.items():
            if v is None:
                mp.delenv(k, raising=False)
            else:
                mp.setenv(k, v)
        yield
