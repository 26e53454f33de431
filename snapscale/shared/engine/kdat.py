"""CRIU's probe of the kernel ("kdat"): every CRIU run starts by probing what the kernel supports
(namespaces, vDSO, pagemap, sockets...), and keeps the answer in `/run/criu.kdat` for the next run,
but only where `/run` is a tmpfs (CRIU's rule: the file must not outlive a boot). Where it is not (a
container whose `/run` is its image's, as compose gave the gpu-host before), each dump and restore
probes again: ~55 ms of a CRIU restore on the dev VM (a failed `criu restore` of an empty dir,
CRIU 4.2.1, 76-92 ms without the cache, 19-24 ms with it). The restorer and the freezer say so at
start (`warn`); the rest is pure.
"""

from __future__ import annotations

import logging

from snapscale.shared.engine.mountinfo import SELF, fs_type_of

log = logging.getLogger(__name__)

KDAT_DIR = "/run"  # CRIU's KDAT_RUNDIR: not configurable at run time


def cache_warning(mountinfo: str) -> str | None:
    """What to tell an operator when CRIU cannot keep its kdat cache here; None when it can."""
    fs = fs_type_of(mountinfo, KDAT_DIR)
    if fs == "tmpfs" or fs is None:
        return None
    return (
        f"{KDAT_DIR} is {fs}, not a tmpfs: CRIU cannot keep its probe of the kernel in "
        f"{KDAT_DIR}/criu.kdat and probes again on every dump and restore (~55 ms each on the dev "
        f"VM); mount a tmpfs at {KDAT_DIR} (compose's gpu-host does; systemd hosts have one)"
    )


def warn() -> str | None:
    """Log `cache_warning` for this process's mount namespace (where CRIU runs); the warning."""
    try:
        text = SELF.read_text()
    except OSError:
        return None
    msg = cache_warning(text)
    if msg:
        log.warning("%s", msg)
    return msg
