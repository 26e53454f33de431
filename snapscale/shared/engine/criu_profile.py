"""Where a `criu restore` spends its time, from its own log (`-v4` timestamps every line).

CRIU 4.2 restores each task's pages inside the restorer blob with `preadv` straight into the
task's fresh memory, so one interval holds the page reads, the page faults and the kernel zeroing
the pages it fills; the log brackets it (`pie: <pid>: Preadv ...` to `` `- returned <bytes>``).
The rest is split at markers CRIU prints on every restore: before forking the tasks (images read,
namespaces, mounts), forking and preparing them (files, memory layout), the restorer's own work
besides page reads (VMAs, threads, vDSO), and after the tasks resume. Pure: text in, numbers out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"^\((\d+)\.(\d{6})\) (.*)$")
_PREADV = re.compile(r"pie: (\d+): Preadv ")
_RETURNED = re.compile(r"pie: (\d+): `- returned (-?\d+)")


@dataclass(frozen=True)
class RestoreProfile:
    """Seconds by phase, measured from CRIU's start; they add up to `logged_s`."""

    logged_s: float  # first to last timestamp
    phases_s: dict[str, float]
    page_bytes: int  # what the preadv calls returned
    page_reads: int
    slowest: list[tuple[float, str]] = field(default_factory=list)  # widest gaps before a line

    @property
    def page_gbps(self) -> float:
        s = self.phases_s.get("page_reads", 0.0)
        return self.page_bytes / s / 1e9 if s > 0 else 0.0


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_restore(log: str, *, top: int = 8) -> RestoreProfile:
    """The phases of one restore from its `-v4` log. Markers a log lacks (an older CRIU, a failed
    restore) leave their phase folded into the one before."""
    times: list[float] = []
    texts: list[str] = []
    for line in log.splitlines():
        m = _LINE.match(line)
        if m:
            times.append(int(m.group(1)) + int(m.group(2)) / 1e6)
            texts.append(m.group(3))
    if not times:
        return RestoreProfile(0.0, {}, 0, 0)
    end = times[-1]

    def first(pattern: str, default: float) -> float:
        return next((t for t, x in zip(times, texts, strict=True) if pattern in x), default)

    t_fork = first("Forking task", end)
    t_switch = max(first("Switched to the restorer", t_fork), t_fork)
    t_done = max(first("Restore finished successfully", end), t_switch)
    open_at: dict[str, float] = {}
    spans: list[tuple[float, float]] = []
    nbytes = reads = 0
    for t, x in zip(times, texts, strict=True):
        if m := _PREADV.search(x):
            open_at[m.group(1)] = t
        elif (m := _RETURNED.search(x)) and m.group(1) in open_at:
            spans.append((open_at.pop(m.group(1)), t))
            nbytes += max(0, int(m.group(2)))
            reads += 1
    pages = _union([(max(a, t_switch), min(b, t_done)) for a, b in spans if b > t_switch and a < t_done])
    phases = {
        "before_fork": t_fork - times[0],
        "fork_and_prepare": t_switch - t_fork,
        "page_reads": pages,
        "restorer_other": t_done - t_switch - pages,
        "after_resume": end - t_done,
    }
    gaps = sorted(
        ((b - a, text) for a, b, text in zip(times, times[1:], texts[1:], strict=False)), reverse=True
    )[:top]
    return RestoreProfile(
        round(end - times[0], 6), {k: round(v, 6) for k, v in phases.items()}, nbytes, reads,
        [(round(g, 6), text[:160]) for g, text in gaps],
    )  # fmt: skip


def profile_file(path: Path) -> RestoreProfile:
    return profile_restore(path.read_text(errors="replace"))
