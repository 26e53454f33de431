"""A deployment's OCI runtime configuration (runc's config.json), from its spec. Pure.

Containment, from the spec with safe defaults (docs/sandbox.md): the spec's uid:gid; Docker's
default capability set (no CAP_SYS_ADMIN, no CAP_SYS_PTRACE, no CAP_NET_ADMIN); no_new_privileges;
the default seccomp profile; cgroup limits for memory (no swap), CPU and PIDs; PID, mount, IPC and
UTS namespaces of its own and the replica's network namespace (made by engine/netns.py) by path;
the image's root (an overlay whose upper layer is the replica's) and only the declared read-only
mounts and the scratch tmpfs from the host; runc's default masked and read-only /proc paths.

No user namespace: CRIU refuses to dump a task whose network namespace does not belong to its user
namespace ("One or more namespaces doesn't belong to the target user namespace", measured with
runc 1.1.5 + CRIU 4.2.1), and the replica's netns is made by the host so that its veth, address
and port forwarding stay the host's. The uid is therefore a host uid without any host file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine.mountinfo import mount_points
from snapscale.shared.engine.oci.gpu import GpuAccess
from snapscale.shared.engine.oci.seccomp import default_profile

OCI_VERSION = "1.0.2"
SCRATCH_DST = "/scratch"
# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip
MASKED = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
)  # fmt: skip
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
CPU_PERIOD_US = 100_000
NOFILE = 1024  # at most the host's hard limit: raising it needs CAP_SYS_RESOURCE, which some hosts lack
MIB = 1 << 20
# CRIU's options beyond runc's flags, as the host sandbox's dump uses them (engine/criu.py): no
# iptables network lock (the replica's netns is its own, and a restore's is fresh, unreachable
# until its endpoint is published; the lock cost ~0.2 s of each restore here) and in-flight
# connections dropped. No cgroup management by CRIU (`manage-cgroups=ignore`; runc 1.1.5's flag
# offers soft, full and strict only, and this file overrides what runc asks): runc has made the
# container's cgroups, set their limits and put CRIU in them, so the restored tree lands there; in
# runc's default (soft) CRIU mounted a yard of every controller to move the tasks where they
# already were: 2-24 ms of each restore on a cgroup v1 host.
CRIU_OPTIONS = "network-lock skip\nskip-in-flight\nmanage-cgroups=ignore\n"


def submounts(mountinfo: str, roots: Sequence[str]) -> dict[str, list[str]]:
    """Each root's host mounts strictly below it (from /proc/self/mountinfo's text), outermost
    first: a declared mount shows them too, each bound on its own so that runc lists it to CRIU as
    external (a recursive bind's submounts it would try to dump: e.g. a squashfs). Pure."""
    points = mount_points(mountinfo)
    out: dict[str, list[str]] = {}
    for root in roots:
        base = root.rstrip("/")
        below = sorted({p for p in points if p.startswith(base + "/")}, key=lambda p: (p.count("/"), p))
        if below:
            out[root] = below
    return out


def _mounts(
    spec: DeploymentSpec, uid: int, gid: int, below: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    ms: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    sb = spec.sandbox
    if sb.scratch_mib:
        ms.append(
            {
                "destination": SCRATCH_DST,
                "type": "tmpfs",
                "source": "scratch",
                "options": [
                    "nosuid",
                    "nodev",
                    f"size={sb.scratch_mib}m",
                    "mode=0700",
                    f"uid={uid}",
                    f"gid={gid}",
                ],
            }
        )
    # Not recursive: the mounts below a declared one (`below`, from the host's mountinfo) are bound
    # one by one, so that runc names each to CRIU as external; a recursive bind's submounts CRIU
    # would try to dump itself (a GPU host's /usr/local/nvidia under /usr is a squashfs: refused).
    for m in sb.mounts:
        binds = [(m.src, m.dst)] + [
            (p, m.dst.rstrip("/") + p[len(m.src.rstrip("/")) :]) for p in below.get(m.src, ())
        ]
        ms.extend(
            {"destination": dst, "type": "bind", "source": src, "options": ["bind", "ro", "nosuid", "nodev"]}
            for src, dst in binds
        )
    return ms


def runtime_config(
    spec: DeploymentSpec,
    *,
    rootfs: str,
    netns_path: str,
    env: Mapping[str, str],
    cgroups_path: str,
    hostname: str,
    gpu: GpuAccess | None = None,
    criu_config: str | None = None,
    below: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """runc's config.json for one replica of `spec`; `below`: each declared mount's host
    submounts (`submounts`). Pure."""
    uid, gid = spec.sandbox.uid_gid
    sb = spec.sandbox
    caps = list(DEFAULT_CAPS)
    mem = sb.memory_mib * MIB
    resources: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}, *(gpu.allow if gpu else [])],
        "memory": {"limit": mem, "swap": mem},
        "cpu": {"quota": int(sb.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US},
        "pids": {"limit": sb.pids},
    }
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(spec.command),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": spec.cwd or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        # runc hands CRIU this file on checkpoint and restore (CRIU_OPTIONS below)
        "annotations": {"org.criu.config": criu_config} if criu_config else {},
        "mounts": [*_mounts(spec, uid, gid, below or {}), *(gpu.mounts if gpu else [])],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": netns_path},
            ],
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "devices": list(gpu.devices) if gpu else [],
            "seccomp": default_profile(),
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
        },
    }
