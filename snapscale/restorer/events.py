"""Replica state on the bus: the event on `evt.replica.<deployment>` and the KV `replicas` record.

KV writes are compare-and-set, retried on a concurrent writer; the event is published after the
KV record, so a reader that sees the event finds the state in KV.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from snapscale.restorer.host import HostTools
from snapscale.restorer.replicas import Live
from snapscale.shared import bus as busmod
from snapscale.shared.bus import (
    Bucket,
    Bus,
    ReplicaEvent,
    ReplicaState,
    can_transition,
    decode_message,
    encode_message,
    replica_key,
)
from snapscale.shared.core.errors import MessageError, RetryableError

log = logging.getLogger(__name__)
CAS_ATTEMPTS = 8


def event(
    t: HostTools,
    deployment: str,
    replica: str,
    state: ReplicaState,
    *,
    command_id: str | None = None,
    reason: str = "",
) -> ReplicaEvent:
    """This host's word on a replica, now; a caller adds what else it knows (dataclasses.replace)."""
    return ReplicaEvent(
        deployment=deployment,
        replica=replica,
        host=t.name,
        state=state,
        ts=t.now(),
        command_id=command_id,
        reason=reason,
    )


def live_event(
    t: HostTools, lv: Live, state: ReplicaState, command_id: str | None, reason: str = ""
) -> ReplicaEvent:
    """The event of a replica this host runs: its tier and checkpoint, and where to reach it unless
    it stopped or failed."""
    ev = event(t, lv.spec.name, lv.sandbox.replica, state, command_id=command_id, reason=reason)
    ev = replace(ev, tier=lv.tier, checkpoint_id=lv.checkpoint_id)
    if state in (ReplicaState.STOPPED, ReplicaState.FAILED):
        return ev
    sb = lv.sandbox
    where = t.forwards.endpoint(sb)
    return replace(ev, endpoint=where, local_endpoint=sb.endpoint, gpu_uuids=list(sb.gpu_uuids))


async def current(b: Bus, deployment: str, replica: str) -> tuple[ReplicaEvent | None, int | None]:
    """The replica's last recorded event and its KV revision (None, None when absent)."""
    got = await busmod.kv_get(b.kv[Bucket.REPLICAS], replica_key(deployment, replica))
    if got is None:
        return None, None
    data, rev = got
    try:
        return decode_message(data, ReplicaEvent), rev
    except MessageError as e:
        log.warning("KV replicas %s.%s holds no replica event (%s); overwriting", deployment, replica, e)
        return None, rev


async def record(b: Bus, ev: ReplicaEvent, *, occasion: str = "") -> None:
    """Write `ev` to KV `replicas` (compare-and-set) and publish it on the replica subject.

    The stream drops a second event of one command in one state (a republished outcome);
    `occasion` tells apart a new event that would otherwise look like one (a re-adoption).
    """
    key = replica_key(ev.deployment, ev.replica)
    for _ in range(CAS_ATTEMPTS):
        old, rev = await current(b, ev.deployment, ev.replica)
        if old is not None and old.state != ev.state and not can_transition(old.state, ev.state):
            # this host owns the replica's life: a new command for an old id starts it afresh
            log.debug("replica %s: %s -> %s outside the table", key, old.state, ev.state)
        try:
            await busmod.kv_cas(b.kv[Bucket.REPLICAS], key, encode_message(ev), rev)
            break
        except RetryableError:
            continue
    else:
        log.error("replica %s: KV write lost to concurrent writers %d times", key, CAS_ATTEMPTS)
    msg_id = f"{ev.host}.{key}.{ev.state}.{ev.command_id or ev.ts}{'.' + occasion if occasion else ''}"
    await busmod.publish(b, b.subjects.evt_replica(ev.deployment), ev, msg_id=msg_id)
    log.info(
        "replica %s %s%s%s",
        key,
        ev.state.value,
        f" tier={ev.tier.value}" if ev.tier else "",
        f" reason={ev.reason!r}" if ev.reason else "",
        extra={"deployment": ev.deployment, "replica": ev.replica},
    )


async def remove(b: Bus, deployment: str, replica: str) -> None:
    """Forget a replica that is gone for good (stopped): its last event stays on the stream."""
    try:
        await b.kv[Bucket.REPLICAS].delete(replica_key(deployment, replica))
    except Exception as e:  # deleting is tidying: never fail a release over it
        log.warning("KV replicas: could not delete %s.%s: %s", deployment, replica, e)


_S = ReplicaState
LIVE = frozenset({_S.STARTING, _S.RESTORING, _S.RESUMING, _S.READY, _S.SUSPENDED})
