"""What a GPU sandbox needs from its host, as the NVIDIA container toolkit would give it: the
control device nodes, the assigned cards' /dev/nvidiaN only, and the driver's user-space libraries
(from `ldconfig -p`) bound read-only at their host paths. Pure, given the host's listing;
`host_listing` reads it (the edge), `HostListing` keeps it for the process: it is a fact of the
host's driver, and reading it (NVML's init, `ldconfig -p`) sat on every restore's critical path.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Any

CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
# The libraries the toolkit mounts for the compute and utility capabilities (libcuda, NVML, PTX JIT...).
_LIB = re.compile(
    r"^(libcuda|libcudadebugger|libnvidia-ml|libnvidia-ptxjitcompiler|libnvidia-nvvm|"
    r"libnvidia-cfg|libnvidia-opencl|libnvidia-gpucomp|libnvidia-allocator|libnvidia-pkcs11)\.so"
)
_LDCONFIG_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)\s*$")


@dataclass(frozen=True)
class DeviceNode:
    path: str
    major: int
    minor: int


@dataclass(frozen=True)
class HostGpus:
    """The host's NVIDIA device nodes (control ones and /dev/nvidiaN) and `ldconfig -p` output."""

    nodes: list[DeviceNode] = field(default_factory=list)
    ldconfig: str = ""
    minors: dict[str, int] = field(default_factory=dict)  # GPU UUID -> the N of /dev/nvidiaN


@dataclass(frozen=True)
class GpuAccess:
    devices: list[dict[str, Any]]  # config.json linux.devices entries
    allow: list[dict[str, Any]]  # linux.resources.devices entries (the cgroup's allow-list)
    mounts: list[dict[str, Any]]  # read-only binds of the driver's libraries


def driver_libraries(ldconfig: str) -> list[str]:
    """The 64-bit driver libraries `ldconfig -p` lists, each path once, sorted. Pure."""
    out: set[str] = set()
    for line in ldconfig.splitlines():
        m = _LDCONFIG_LINE.match(line)
        if m and _LIB.match(m.group(1)) and ("x86-64" in m.group(2) or "AArch64" in m.group(2)):
            out.add(m.group(3))
    return sorted(out)


def gpu_access(host: HostGpus, assigned: list[str]) -> GpuAccess:
    """Device entries and mounts for the GPUs `assigned` (UUIDs); an unknown UUID is refused. Pure."""
    by_path = {n.path: n for n in host.nodes}
    want = [p for p in CONTROL_NODES if p in by_path]
    for uuid in assigned:
        if uuid not in host.minors:
            raise ValueError(f"GPU {uuid} is not on this host")
        path = f"/dev/nvidia{host.minors[uuid]}"
        if path not in by_path:
            raise ValueError(f"GPU {uuid}: no device node {path}")
        want.append(path)
    nodes = [by_path[p] for p in want]
    devices = [
        {
            "path": n.path,
            "type": "c",
            "major": n.major,
            "minor": n.minor,
            "fileMode": 0o666,
            "uid": 0,
            "gid": 0,
        }
        for n in nodes
    ]
    allow = [{"allow": True, "type": "c", "major": n.major, "minor": n.minor, "access": "rw"} for n in nodes]
    mounts = [
        {"destination": p, "type": "bind", "source": p, "options": ["bind", "ro", "nosuid", "nodev"]}
        for p in driver_libraries(host.ldconfig)
    ]
    return GpuAccess(devices=devices, allow=allow, mounts=mounts)


def host_listing(minors: dict[str, int]) -> HostGpus:
    """This host's NVIDIA device nodes and `ldconfig -p`; `minors` maps UUIDs to card numbers (NVML)."""
    nodes: list[DeviceNode] = []
    paths = [*CONTROL_NODES, *(f"/dev/nvidia{m}" for m in sorted(set(minors.values())))]
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            nodes.append(DeviceNode(p, os.major(st.st_rdev), os.minor(st.st_rdev)))
    try:
        ld = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        ld = ""
    return HostGpus(nodes=nodes, ldconfig=ld, minors=dict(minors))


def nvml_minors() -> dict[str, int]:
    """UUID -> minor number of every GPU NVML sees (empty without a driver)."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError subclasses, OSError without a driver
        return {}
    try:
        out: dict[str, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            u = pynvml.nvmlDeviceGetUUID(h)
            out[u.decode() if isinstance(u, bytes) else str(u)] = int(pynvml.nvmlDeviceGetMinorNumber(h))
        return out
    finally:
        pynvml.nvmlShutdown()


class HostListing:
    """This host's GPU listing, read once per process (off the event loop) and read again only when
    a launch names a GPU it does not hold (a card reset or added since): NVML's init and
    `ldconfig -p` cost every GPU restore tens of milliseconds or more, for a listing that changes
    only with the driver."""

    def __init__(self) -> None:
        self._host: HostGpus | None = None
        self.reads = 0

    async def access(self, assigned: list[str]) -> GpuAccess:
        """`gpu_access` for `assigned` from the kept listing; ValueError as `gpu_access` says.
        Two first calls at once may both read the host: harmless, and no lock bound to a loop."""
        if self._host is not None:
            try:
                return gpu_access(self._host, assigned)
            except ValueError:
                pass  # read the host again before refusing
        self._host = await asyncio.to_thread(_read_host)
        self.reads += 1
        return gpu_access(self._host, assigned)


def _read_host() -> HostGpus:
    return host_listing(nvml_minors())
