"""Restart safety: take back what a previous run of the restorer left on this host.

Live sandboxes in the registry are re-adopted (probed ready, or kept suspended); dead ones and
restores a crash cut short are reaped and reported failed. Nothing here serves commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from snapscale.restorer import events, inventory
from snapscale.restorer.cleanup import reap
from snapscale.restorer.errors import describe
from snapscale.restorer.host import Host, HostTools
from snapscale.restorer.replicas import Live
from snapscale.restorer.slots import Grant
from snapscale.restorer.specs import deployed_spec
from snapscale.shared import engine
from snapscale.shared.bus import ReplicaEvent, ReplicaState
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import Sandbox, is_running

log = logging.getLogger(__name__)


async def adopt(h: Host) -> None:
    """Take back the sandboxes a previous run left: live ones are re-adopted, dead ones cleaned up
    and reported failed; restores a crash cut short are reaped and reported failed."""
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
    for e in unfinished.values():
        if e.replica in adopted:  # it was up (the crash came between ready and the ledger)
            t.ledger.finish(e.id, ok=True, outcome="re-adopted after a restart")
            continue
        try:  # from the ids, never the path the entry holds
            run_dir = t.run_dir(e.replica, e.id)
        except ValueError as err:  # one entry that cannot be replayed must not keep the restorer down
            t.ledger.quarantine(e.id, f"cannot be replayed: {err}")
            continue
        await reap(run_dir)
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
    await events.record(
        t.bus,
        ReplicaEvent(
            deployment=sb.deployment,
            replica=sb.replica,
            host=t.name,
            state=ReplicaState.READY,
            ts=t.now(),
            command_id=last.command_id if last else None,
            tier=tier,
            reason="re-adopted after a restorer restart",
            endpoint=t.forwards.endpoint(sb),
            local_endpoint=sb.endpoint,
            checkpoint_id=sb.checkpoint_id,
            gpu_uuids=list(sb.gpu_uuids),
        ),
        occasion=f"readopted-{t.now():.3f}",
    )
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
