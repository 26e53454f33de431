"""Replicas that die while ready or suspended: a workload that exits or crashes, or one the kernel's
OOM killer ends inside its cgroup. A watch on this host's live replicas notices each within
`WATCH_S`, stops what is left of it (its slot freed; its netns, container, overlay and forwards
removed) and reports it `failed` with why (`out of memory: limit <N> MiB`, from the container's
cgroup, read before runc deletes it), so the scaler places the deployment again and the gateways
stop routing to it. Before, only a restart of the restorer noticed (restart.py): the replica stayed
`ready` in KV, its slot taken, its endpoint dead. A replica that a freeze ended on purpose (without
keep-running; the engine marks its run dir) is reported `stopped` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from snapscale.restorer.host import Host
from snapscale.restorer.release import stop_replica
from snapscale.restorer.replicas import Live
from snapscale.shared import engine
from snapscale.shared.bus import ReplicaState
from snapscale.shared.engine import Sandbox

log = logging.getLogger(__name__)
WATCH_S = 1.0  # a /proc read per live replica: cheap
STOPPED_BY_FREEZE = "frozen and stopped: a freeze that did not keep it running"
WATCHED = frozenset({ReplicaState.READY, ReplicaState.SUSPENDED})  # being started or stopped: not ours


def dead(replicas: Iterable[Live], running: Callable[[Sandbox], bool]) -> list[Live]:
    """The watched replicas whose sandbox is no longer `running`. Pure, given `running`."""
    return [lv for lv in replicas if lv.state in WATCHED and not running(lv.sandbox)]


def death_reason(state: ReplicaState, why: str | None) -> str:
    """What a dead replica's `failed` event says: `why` is the system's record (an OOM kill). Pure."""
    return f"the sandbox died while {state.value}: {why or 'its process exited'}"


async def reap_dead(h: Host) -> list[str]:
    """Stop and report failed every watched replica whose sandbox died; the replicas reaped."""
    out = []
    for lv in dead(list(h.replicas.live.values()), engine.is_running):
        if h.replicas.live.get(lv.sandbox.replica) is not lv or lv.state not in WATCHED:
            continue  # a release took it while an earlier one was being reaped
        if engine.stopped_by_freeze(lv.sandbox):  # `snapscale freeze` without keep-running
            reason, final = STOPPED_BY_FREEZE, ReplicaState.STOPPED
            log.info("replica %s: %s", lv.sandbox.replica, reason, extra={"deployment": lv.spec.name})
        else:
            reason, final = death_reason(lv.state, engine.exit_reason(lv.sandbox)), ReplicaState.FAILED
            log.warning("replica %s: %s", lv.sandbox.replica, reason, extra={"deployment": lv.spec.name})
        await stop_replica(h, lv, None, reason, final=final)
        out.append(lv.sandbox.replica)
    return out


async def watch(h: Host, stop: asyncio.Event, interval_s: float = WATCH_S) -> None:
    """`reap_dead` every `interval_s` until `stop`; one failed pass is logged and the watch goes on."""
    while not stop.is_set():
        try:
            await reap_dead(h)
        except Exception as e:
            log.warning("watching the replicas for deaths failed: %s", e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
