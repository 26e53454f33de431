"""What this host has: its GPUs (NVML; none means a CPU host), a sandbox's resident memory,
and the heartbeat that carries the inventory to the scaler. NVML and /proc reads only; no bus.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from snapscale.shared.bus import GpuInfo, HostHeartbeat, ReplicaSummary

log = logging.getLogger(__name__)


def probe_gpus() -> list[GpuInfo]:
    """The host's GPUs by NVML, or [] where there is no NVIDIA driver (a CPU host)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no library, no driver: both mean "no GPUs here"
        log.info("no NVML (%s): a CPU host", e)
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(
                GpuInfo(
                    index=i,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    model=name.decode() if isinstance(name, bytes) else str(name),
                    memory_bytes=int(mem.total),
                )
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def _pid_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def tree_rss_bytes(pid: int, proc: Path = Path("/proc")) -> int:
    """Resident memory of every process in `pid`'s PID namespace (the sandbox's whole tree)."""
    ns = _pid_ns(pid)
    if ns is None:
        return 0
    total = 0
    for d in proc.iterdir():
        if not d.name.isdigit() or _pid_ns(int(d.name)) != ns:
            continue
        try:
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return total


def heartbeat(
    *,
    host: str,
    now: float,
    compat_hash: str,
    compat: dict[str, str],
    gpus: list[GpuInfo],
    cpu_slots: int,
    cached: dict[str, tuple[int, int]],
    replicas: list[ReplicaSummary],
    suspend_budget_bytes: int,
    interval_s: float,
    compat_hashes: dict[str, str] | None = None,
    started_at: float = 0.0,
) -> HostHeartbeat:
    """The inventory message. `cached` maps checkpoint id -> (bytes present, bytes needed)."""
    return HostHeartbeat(
        host=host,
        ts=now,
        compat_hash=compat_hash,
        compat=dict(compat),
        gpus=list(gpus),
        cached_checkpoints=sorted(c for c, (have, need) in cached.items() if have >= need),
        cached_bytes={c: have for c, (have, _need) in cached.items()},
        replicas=list(replicas),
        suspend_budget_bytes=suspend_budget_bytes,
        suspend_used_bytes=sum(r.rss_bytes for r in replicas if r.state.value == "suspended"),
        cpu_slots=cpu_slots,
        interval_s=interval_s,
        compat_hashes=dict(compat_hashes or {}),
        started_at=started_at,
    )
