"""Restart safety: take back what a previous run of the restorer left on this host.

Live sandboxes in the registry are re-adopted (probed ready, or kept suspended); dead ones and
restores a crash cut short are reaped and reported failed; what else a crash left (image dirs,
run dirs, network namespaces, processes, hot images) is removed and said. Nothing here serves
commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from snapscale.restorer import events, inventory
from snapscale.restorer.cleanup import owned_netns, reap, sweep
from snapscale.restorer.errors import describe
from snapscale.restorer.host import Host, HostTools
from snapscale.restorer.replicas import Live
from snapscale.restorer.scaleup import request_freeze
from snapscale.restorer.slots import Grant
from snapscale.restorer.specs import deployed_spec
from snapscale.restorer.standby import FILLERS_DIR
from snapscale.shared import engine
from snapscale.shared.bus import ReplicaEvent, ReplicaState, Tier
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import Sandbox, is_running

log = logging.getLogger(__name__)


async def adopt(h: Host) -> None:
    """Take back the sandboxes a previous run left: live ones are re-adopted, dead ones cleaned up
    and reported failed; restores a crash cut short are cleaned up with everything else a crash
    left (`_sweep`) and reported failed."""
    t = h.tools
    unfinished = {}
    for e in t.ledger.unfinished():
        if e.verb == "scale-up":
            unfinished[e.replica] = e
        else:
            t.ledger.finish(e.id, ok=False, outcome="interrupted by a restart")
    found = await _forwarded(t, t.registry.all())
    # probed together: one slow sandbox must not hold the others' re-adoption up
    verdicts = await asyncio.gather(*(_adopt_one(h, sb) for sb in found))
    adopted: set[str] = set()
    for sb, why in zip(found, verdicts, strict=True):
        if why is None:
            adopted.add(sb.replica)
            continue
        log.warning("replica %s not re-adopted: %s", sb.replica, why)
        with contextlib.suppress(Exception):
            await engine.stop(sb)
        await t.forwards.close(sb.replica)
        t.registry.remove(sb.replica)
        if sb.run_dir:
            await reap(Path(sb.run_dir))
        if sb.replica not in unfinished:  # else reported once, below, with its command
            await _report_failed(t, sb.deployment, sb.replica, why)
    cut_short = []
    for e in unfinished.values():
        if e.replica not in adopted:
            cut_short.append(e)
            continue
        # it was up (the crash came during its ready probe, or between ready and the ledger)
        lv = h.replicas.live[e.replica]
        if lv.tier is Tier.COLD and lv.spec.freeze.after_ready and t.config.auto_freeze:
            try:  # the cold boot's own request, by the same id: a second one is not frozen twice
                await request_freeze(t, lv, e.id)
            except Exception as err:  # the replica serves either way; the scaler may ask again
                log.warning("auto-freeze request for %s failed: %s", e.replica, err)
        t.ledger.finish(e.id, ok=True, outcome="re-adopted after a restart")
    replayable, run_dirs = [], []
    for e in cut_short:
        try:  # from the ids, never the path the entry holds
            run_dirs.append(t.run_dir(e.replica, e.id))
        except ValueError as err:  # one entry that cannot be replayed must not keep the restorer down
            t.ledger.quarantine(e.id, f"cannot be replayed: {err}")
            continue
        replayable.append(e)
    await _sweep(h, run_dirs)
    for e in replayable:
        reason = "the restorer restarted mid-restore; what it had started was cleaned up"
        await _report_failed(t, e.deployment, e.replica, reason, command_id=e.id)
        t.ledger.finish(e.id, ok=False, outcome=f"failed: {reason}")


async def _forwarded(t: HostTools, found: list[Sandbox]) -> list[Sandbox]:
    """`found` with the host ports forwarded to the live ones: kept, or given again when the kernel
    lost them (a reboot); forwards to sandboxes gone are removed. Before any event names an endpoint."""
    alive = [sb for sb in found if is_running(sb)]
    now = {sb.replica: sb for sb in await t.forwards.reconcile(alive)}
    for sb in alive:
        if now[sb.replica] != sb:
            t.registry.put(now[sb.replica])
    return [now.get(sb.replica, sb) for sb in found]


async def _sweep(h: Host, cut_short: list[Path]) -> None:
    """Remove what a crash left besides the registry's sandboxes: the run dirs of `cut_short`
    restores, every image dir (none is being assembled yet), the network namespaces this
    restorer made that no live sandbox uses, and every process tied to them, weights fillers
    included (they hold the fillers dir open). One log line a kind."""
    t = h.tools
    images_root = t.config.images_root(t.settings)
    images = sorted(images_root.iterdir()) if images_root.is_dir() else []
    live_netns = {lv.sandbox.netns for lv in h.replicas.live.values()}
    netns = owned_netns(t.work_dir / "run", keep=live_netns)
    fillers = t.work_dir / FILLERS_DIR  # weights fillers a crash left (each holds it open)
    pids = await sweep([*images, *cut_short, fillers], netns)
    _said("half-assembled image dirs", [p.name for p in images])
    _said("run dirs of cut-short restores", [p.name for p in cut_short])
    _said("network namespaces of unknown sandboxes", netns)
    _said("processes of unknown sandboxes", [str(p) for p in pids])
    _said("hot images", t.hot.dropped_at_start if t.hot is not None else [])


def _said(kind: str, removed: list[str]) -> None:
    if removed:
        log.warning("at start: removed %d %s: %s", len(removed), kind, ", ".join(removed))
    else:
        log.info("at start: no %s left behind", kind)


async def _adopt_one(h: Host, sb: Sandbox) -> str | None:
    """None when `sb` is back under this restorer; else why not."""
    t = h.tools
    if not is_running(sb):
        return "the sandbox died while the restorer was down"
    try:
        spec = await deployed_spec(t.bus, sb.deployment)
    except ConfigError as e:
        return str(e)
    last, _rev = await events.current(t.bus, sb.deployment, sb.replica)
    suspended = last is not None and last.state is ReplicaState.SUSPENDED
    tier = last.tier if last is not None else None
    if suspended:
        since = last.ts if last else t.now()
        h.replicas.live[sb.replica] = Live(
            spec, sb, ReplicaState.SUSPENDED, tier, since, sb.checkpoint_id, inventory.tree_rss_bytes(sb.pid)
        )
        return None
    try:
        await engine.wait_ready(sb, spec.ready, cwd=spec.cwd, timeout_s=t.config.adopt_ready_timeout_s)
    except Exception as e:
        return f"re-adoption probe failed: {describe(e)}"
    t.slots.adopt(Grant(sb.replica, tuple(sb.gpu_uuids), cpu_slot=not sb.gpu_uuids))
    lv = Live(spec, sb, ReplicaState.READY, tier, t.now(), sb.checkpoint_id)
    h.replicas.live[sb.replica] = lv
    reason = "re-adopted after a restorer restart"
    ev = events.live_event(t, lv, ReplicaState.READY, last.command_id if last else None, reason)
    await events.record(t.bus, ev, occasion=f"readopted-{t.now():.3f}")
    return None


async def _report_failed(
    t: HostTools, deployment: str, replica: str, reason: str, command_id: str | None = None
) -> None:
    await events.record(
        t.bus,
        ReplicaEvent(
            deployment=deployment,
            replica=replica,
            host=t.name,
            state=ReplicaState.FAILED,
            ts=t.now(),
            command_id=command_id,
            reason=reason,
        ),
    )


def prune_run_dirs(h: Host, older_than: float) -> int:
    """Delete attempt folders (logs of failed attempts) older than `older_than` that no live
    sandbox uses; the number deleted."""
    root = h.tools.work_dir / "run"
    if not root.exists():
        return 0
    in_use = {h.tools.attempt_dir(lv.sandbox.run_dir) for lv in h.replicas.live.values()}
    n = 0
    for d in root.iterdir():
        if d in in_use or not d.is_dir():
            continue
        try:
            if d.stat().st_mtime < older_than:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        except OSError:
            continue
    return n
