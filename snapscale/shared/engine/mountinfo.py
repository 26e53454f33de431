"""/proc/<pid>/mountinfo texts, read by the OCI sandbox (the host mounts below a declared mount;
the overlays a crash left) and by the CRIU kdat check (which filesystem holds /run). Pure, but
`SELF`, the path of this process's own.
"""

from __future__ import annotations

from pathlib import Path

SELF = Path("/proc/self/mountinfo")  # this mount namespace: the host's, where runc binds from


def unescape(field: str) -> str:
    """A mountinfo path field: space, tab, newline and backslash come octal-escaped."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mount_points(mountinfo: str) -> list[str]:
    """The mount points of a mountinfo text, unescaped, in its order."""
    return [unescape(line.split()[4]) for line in mountinfo.splitlines() if len(line.split()) > 4]


def fs_type_of(mountinfo: str, path: str) -> str | None:
    """The filesystem type of the mount that holds `path`: of the mounts in /proc/self/mountinfo's
    text whose mount point is `path` or above it, the deepest, the last of equals (mounted over the
    others); None when the text names none."""
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        point = unescape(fields[4])
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best[0])
        ):
            best = (point, tail.split()[0])
    return None if best is None else best[1]
