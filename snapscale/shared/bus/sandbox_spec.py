"""The deployment's `[sandbox]` table: the OCI image it runs and what contains it. Pure.

    [sandbox]
    image = "oci:/srv/images/sample@sha256:<64 hex>"   # or docker-archive:<path>, docker://<ref>@sha256:<hex>
    user = "1000:1000"                                 # uid:gid inside the container
    memory_mib = 2048                                  # cgroup memory limit (the OOM killer acts inside it)
    cpus = 2.0                                         # CFS quota, in CPUs
    pids = 512                                         # cgroup pids limit
    scratch_mib = 256                                  # writable tmpfs at /scratch (0: none)
    mounts = [{ src = "/srv/models/sample", dst = "/models" }]   # read-only host paths

No `image` is a host-process sandbox, run only on a host in development mode (docs/sandbox.md).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from snapscale.shared.core.fieldcheck import Check, Limits, Range

DIGEST_RE = r"sha256:[0-9a-f]{64}"
_IMAGE = re.compile(
    rf"^(oci:(?P<layout>/[^@]+)@(?P<d1>{DIGEST_RE})|docker-archive:(?P<archive>/.+)|"
    rf"docker://(?P<ref>[^@\s]+)@(?P<d2>{DIGEST_RE}))$"
)
_USER = re.compile(r"^(\d{1,10}):(\d{1,10})$")
MAX_ID = 2**31 - 2
# Where a read-only mount may not land: the image's own system directories and the runtime's.
_RESERVED_DST = ("/proc", "/sys", "/dev", "/etc", "/scratch")


def check_image(value: str | None) -> None:
    """`oci:<layout dir>@sha256:<hex>`, `docker-archive:<path>` or `docker://<ref>@sha256:<hex>`:
    an image named by its digest (a tag could move under a checkpoint)."""
    if value is None:
        return
    if len(value) > 1024 or not _IMAGE.match(value):
        raise ValueError(
            "must be oci:<absolute layout dir>@sha256:<64 hex>, docker-archive:<absolute path> or "
            "docker://<reference>@sha256:<64 hex> (an image by digest)"
        )


def check_user(value: str) -> None:
    m = _USER.match(value)
    if not m or int(m.group(1)) > MAX_ID or int(m.group(2)) > MAX_ID:
        raise ValueError(f"must be <uid>:<gid>, numbers up to {MAX_ID}")


def _abs_clean(value: str, what: str) -> None:
    if not value.startswith("/") or posixpath.normpath(value) != value or "\n" in value or "," in value:
        raise ValueError(f"{what} must be an absolute, normalised path without ',' ({value[:60]!r})")


def check_mounts(value: list[Any]) -> None:
    """Each mount's paths (the door sees the tables, already typed as {src, dst} strings)."""
    if len(value) > 32:
        raise ValueError(f"{len(value)} mounts, at most 32")
    seen: set[str] = set()
    for i, m in enumerate(value):
        src, dst = (m["src"], m["dst"]) if isinstance(m, dict) else (m.src, m.dst)
        try:
            _abs_clean(src, "src")
            _abs_clean(dst, "dst")
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
        if dst == "/" or any(dst == r or dst.startswith(r + "/") for r in _RESERVED_DST):
            raise ValueError(f"[{i}]: dst {dst} is reserved (/, {', '.join(_RESERVED_DST)})")
        if dst in seen:
            raise ValueError(f"[{i}]: dst {dst} is mounted twice")
        seen.add(dst)


@dataclass(frozen=True)
class Mount:
    """A host path the workload may read (never write), at `dst` inside its root."""

    src: str
    dst: str


@dataclass(frozen=True)
class SandboxSpec:
    LIMITS: ClassVar[Limits] = {
        "image": Check(check_image),
        "user": Check(check_user),
        "memory_mib": Range(16, 4 << 20, "MiB"),
        "cpus": Range(0, 1024, above=True),
        "pids": Range(8, 1 << 20),
        "scratch_mib": Range(0, 1 << 20, "MiB"),
        "mounts": Check(check_mounts),
    }

    image: str | None = None  # None: a host-process sandbox (development mode only)
    user: str = "1000:1000"
    memory_mib: int = 4096
    cpus: float = 4.0
    pids: int = 1024
    scratch_mib: int = 0
    mounts: list[Mount] = field(default_factory=list)

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, gid = self.user.split(":")
        return int(uid), int(gid)
