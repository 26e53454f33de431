"""The compatibility key: where a checkpoint may be restored. Canonical JSON, a hash, a field diff.

GPU model/count and driver from NVML (no NVML -> "cpu"), the CUDA driver API version, CRIU version,
kernel release, the sandbox's runtime fingerprint (an OCI sandbox's image digest), the spec hash
and the format version.
Reading the host is at the edge (`host_key`); the key itself and `diff` are pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.errors import NoCudaError

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the image layout or the engine's meta file changes
_FULL_HASH_BYTES = 64 << 20  # bigger files are fingerprinted by size + head + tail (weights are GiBs)
_EDGE_BYTES = 1 << 20


@dataclass(frozen=True)
class CompatKey:
    gpu_model: str
    gpu_count: str
    driver_version: str
    cuda_driver_version: str
    criu_version: str
    kernel_release: str
    runtime_fingerprint: str
    spec_hash: str
    format_version: str = FORMAT_VERSION

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    def canonical(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()

    def hash(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> CompatKey:
        return cls(**{k: str(d.get(k, "")) for k in cls.__dataclass_fields__})


def diff(a: CompatKey | dict[str, str], b: CompatKey | dict[str, str]) -> list[str]:
    """The fields that differ, each as `name: a -> b`, sorted by name. Pure."""
    da = a.as_dict() if isinstance(a, CompatKey) else dict(a)
    db = b.as_dict() if isinstance(b, CompatKey) else dict(b)
    return [
        f"{k}: {da.get(k, '<none>')} -> {db.get(k, '<none>')}"
        for k in sorted(da.keys() | db.keys())
        if da.get(k) != db.get(k)
    ]


@dataclass(frozen=True)
class GpuHost:
    model: str
    count: int
    driver: str


def read_gpus() -> GpuHost:
    """NVML's view of this host; no NVML (no driver, no pynvml) is a CPU host."""
    try:
        import pynvml
    except ImportError:
        return GpuHost("cpu", 0, "none")
    try:
        pynvml.nvmlInit()
    except Exception as e:  # pynvml raises NVMLError subclasses, and OSError without a driver
        log.debug("no NVML: %s", e)
        return GpuHost("cpu", 0, "none")
    try:
        n = pynvml.nvmlDeviceGetCount()
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        model = _text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))) if n else "cpu"
        return GpuHost(model, n, driver)
    finally:
        pynvml.nvmlShutdown()


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def cuda_driver_version() -> str:
    from snapscale.shared.engine import cuda as cuda_ckpt

    try:
        return str(cuda_ckpt.driver().driver_version())
    except NoCudaError:
        return "none"


def file_digest(path: Path) -> str:
    """SHA-256 of a file; past 64 MiB of size, of its size, first and last MiB (weights are GiBs)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"size={size}".encode())
            h.update(f.read(_EDGE_BYTES))
            f.seek(size - _EDGE_BYTES)
            h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()


def runtime_fingerprint(spec: DeploymentSpec) -> str:
    """An OCI sandbox's image digest (oci_identity); for a host-process sandbox (development mode)
    the interpreter (command[0], resolved, and its bytes) and every file the spec names as image."""
    if spec.sandbox.image is not None:
        return hashlib.sha256(f"oci-image={oci_identity(spec.sandbox.image)}".encode()).hexdigest()
    h = hashlib.sha256()
    cwd = Path(spec.cwd) if spec.cwd else Path.cwd()
    exe = spec.command[0]
    found = exe if os.path.isabs(exe) else shutil.which(exe, path=spec.env.get("PATH")) or str(cwd / exe)
    real = Path(found).resolve()
    h.update(f"exe={exe}:{real}:".encode())
    h.update(file_digest(real).encode() if real.is_file() else b"missing")
    for item in spec.image:
        p = Path(item) if os.path.isabs(item) else cwd / item
        files = sorted(q for q in p.rglob("*") if q.is_file() and not _derived(q)) if p.is_dir() else [p]
        for f in files:
            h.update(f"\nimage={f}:".encode())
            h.update(file_digest(f).encode() if f.is_file() else b"missing")
    return h.hexdigest()


def oci_identity(image: str) -> str:
    """The digest the image reference names; a docker-archive (named by path) by its file's digest."""
    if image.startswith("docker-archive:"):
        path = Path(image.removeprefix("docker-archive:"))
        return f"archive-sha256:{file_digest(path)}" if path.is_file() else f"missing:{path}"
    return image.rsplit("@", 1)[1]


def _derived(path: Path) -> bool:
    """Bytecode the interpreter writes while the workload runs: a cold boot creates it, so a key
    taken before the first boot and one taken after must not differ by it."""
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")


def host_key(spec: DeploymentSpec, *, criu: CriuBinary, gpu_count: int) -> CompatKey:
    """This host's key for `spec` with `gpu_count` GPUs per replica (0: a CPU sandbox)."""
    gpus = read_gpus() if gpu_count else GpuHost("cpu", 0, "none")
    return CompatKey(
        gpu_model=gpus.model if gpu_count else "cpu",
        gpu_count=str(gpu_count),
        driver_version=gpus.driver,
        cuda_driver_version=cuda_driver_version() if gpu_count else "none",
        criu_version=criu.version,
        kernel_release=platform.release(),
        runtime_fingerprint=runtime_fingerprint(spec),
        spec_hash=spec.spec_hash(),
    )
