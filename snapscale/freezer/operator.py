"""`snapscale freeze` (through `snapscale.client`): finds the replica (KV `replicas`), sends a
forced freeze command to its host and waits for that command's checkpoint event.

Picking the replica and formatting the answer are pure; the bus round trip is the only I/O.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from snapscale.shared import bus
from snapscale.shared.bus import (
    Bucket,
    CheckpointEvent,
    FreezeCommand,
    ReplicaEvent,
    ReplicaState,
    Verb,
    decode_message,
)
from snapscale.shared.core.errors import MessageError, NotFoundError
from snapscale.shared.core.units import format_duration, format_size


@dataclass(frozen=True)
class Target:
    replica: str
    host: str


def pick_target(
    replicas: list[ReplicaEvent], deployment: str, *, replica: str | None, host: str | None
) -> Target:
    """The replica to freeze: the one named, else a ready one (on `host` if given), oldest first."""
    mine = [r for r in replicas if r.deployment == deployment]
    if replica is not None:
        named = [r for r in mine if r.replica == replica]
        if host is not None:
            return Target(replica, host)  # the operator knows best; the freezer checks it exists
        if not named:
            raise NotFoundError(f"replica {replica} of {deployment} is not in KV 'replicas': pass --host")
        return Target(replica, named[0].host)
    ready = sorted(
        (r for r in mine if r.state is ReplicaState.READY and (host is None or r.host == host)),
        key=lambda r: (r.ts, r.replica),
    )
    if not ready:
        states = ", ".join(f"{r.replica}@{r.host}={r.state.value}" for r in mine) or "none"
        raise NotFoundError(
            f"no ready replica of {deployment}{' on ' + host if host else ''} (replicas: {states})"
        )
    return Target(ready[0].replica, ready[0].host)


def format_event(ev: CheckpointEvent) -> str:
    if not ev.ok:
        return f"freeze of {ev.deployment}/{ev.replica} on {ev.host} FAILED: {ev.reason}"
    if ev.skipped:
        return f"freeze of {ev.deployment}/{ev.replica} on {ev.host} skipped: {ev.reason}"
    lines = [
        f"checkpoint {ev.checkpoint_id} of {ev.deployment} (replica {ev.replica} on {ev.host})",
        f"  compat {ev.compat_hash[:16]}",
    ]
    if ev.sizes:
        lines.append("  sizes  " + "  ".join(f"{k} {format_size(v)}" for k, v in ev.sizes.items()))
    if ev.timings_s:
        lines.append("  times  " + "  ".join(f"{k} {v:.2f}s" for k, v in ev.timings_s.items()))
    if ev.reason:
        lines.append(f"  {ev.reason}")
    return "\n".join(lines)


async def replicas_in_kv(b: bus.Bus, deployment: str) -> list[ReplicaEvent]:
    kv = b.kv[Bucket.REPLICAS]
    out: list[ReplicaEvent] = []
    for k in await bus.kv_keys(kv):
        if not k.startswith(f"{deployment}."):
            continue
        got = await bus.kv_get(kv, k)
        if got is None:
            continue
        try:
            out.append(decode_message(got[0], ReplicaEvent))
        except MessageError:
            continue  # not ours to judge; the restorer logs its own bad records
    return out


async def freeze(
    b: bus.Bus,
    deployment: str,
    *,
    replica: str | None = None,
    host: str | None = None,
    keep_running: bool = True,
    timeout_s: float = 600.0,
    on_sent: Callable[[Target], None] | None = None,
) -> CheckpointEvent:
    """Send a forced freeze and wait for its event; raises `TimeoutError` when none comes.
    `on_sent` learns which replica and host were asked, once the command is out."""
    target = pick_target(await replicas_in_kv(b, deployment), deployment, replica=replica, host=host)
    cmd = FreezeCommand(
        id=f"op-{uuid.uuid4().hex}",
        deployment=deployment,
        replica=target.replica,
        issued_at=time.time(),
        keep_running=keep_running,
        force=True,
    )
    got: asyncio.Future[CheckpointEvent] = asyncio.get_running_loop().create_future()

    async def on_event(ev: CheckpointEvent, _m: Msg) -> None:
        if ev.command_id == cmd.id and not got.done():
            got.set_result(ev)

    # subscribe before sending, so a fast freezer cannot answer into the void
    sub, _ = await bus.subscribe_core(b, b.subjects.evt_checkpoint(deployment), CheckpointEvent, on_event)
    try:
        await bus.publish(b, b.subjects.cmd(Verb.FREEZE, target.host), cmd, msg_id=cmd.id)
        if on_sent is not None:
            on_sent(target)
        try:
            return await asyncio.wait_for(got, timeout_s)
        except TimeoutError:
            # the event may have been published while we were not subscribed (reconnect)
            ev = await _from_stream(b, deployment, cmd.id)
            if ev is None:
                raise TimeoutError(
                    f"no checkpoint event for command {cmd.id} within {format_duration(timeout_s)} "
                    f"(is `snapscale freezer --host {target.host}` running?)"
                ) from None
            return ev
    finally:
        await sub.unsubscribe()  # type: ignore[attr-defined]


async def _from_stream(b: bus.Bus, deployment: str, command_id: str) -> CheckpointEvent | None:
    """The event, if the stream holds it (it is stored under its dedup id's message)."""
    from nats.js.errors import NotFoundError as NoMessage

    try:
        m = await b.js.get_last_msg(b.subjects.evt_stream, b.subjects.evt_checkpoint(deployment))
    except NoMessage:
        return None
    if m.data is None:
        return None
    try:
        ev = decode_message(m.data, CheckpointEvent)
    except MessageError:
        return None
    return ev if ev.command_id == command_id else None
