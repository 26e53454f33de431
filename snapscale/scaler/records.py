"""What the scaler knows of each replica: its last `ReplicaEvent` (the same value the restorer
keeps in KV `replicas` under `<deployment>.<replica>`) plus when the scaler placed it.

Pure: how an event moves a replica (the transition table in shared/messages decides). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from snapscale.shared.bus import ReplicaEvent, ReplicaState, can_transition, replica_key

S = ReplicaState
# states that hold (or are about to hold) capacity and count towards the current replica count
LIVE = frozenset({S.PENDING, S.STARTING, S.RESTORING, S.RESUMING, S.READY})
COMING = frozenset({S.PENDING, S.STARTING, S.RESTORING, S.RESUMING})  # not ready yet: may time out
TERMINAL = frozenset({S.STOPPED, S.FAILED})
# what a host still holds for a deployment: a removed one is forgotten only once none is left
HOLDING = LIVE | {S.RELEASING, S.SUSPENDED}


@dataclass
class Tracked:
    ev: ReplicaEvent  # the replica's last known state
    revision: int | None  # its KV revision, for compare-and-set; None: not in KV
    placed_at: (
        float  # when the scaler sent its restore (or first saw it): the ready deadline counts from here
    )

    @property
    def key(self) -> str:
        return replica_key(self.ev.deployment, self.ev.replica)


def apply_event(cur: ReplicaEvent | None, ev: ReplicaEvent) -> ReplicaEvent | None:
    """The replica's state after `ev`, or None when the event changes nothing.

    Stale, repeated and disallowed transitions change nothing. An event for a replica the
    scaler has no record of is adopted while the replica is alive (including suspended), so
    a restorer's replicas from before a scaler restart are counted and may be resumed.
    """
    if cur is None:
        return None if ev.state in TERMINAL else ev
    if ev.state == cur.state:
        return None
    # a restorer may report only the outcome of a start; ready ends any of the starting states
    skip_ahead = cur.state in COMING and ev.state is S.READY
    if not (skip_ahead or can_transition(cur.state, ev.state)):
        return None
    return replace(
        ev,
        gpu_uuids=list(ev.gpu_uuids) or cur.gpu_uuids,
        endpoint=ev.endpoint or cur.endpoint,
        local_endpoint=ev.local_endpoint or cur.local_endpoint,
        checkpoint_id=ev.checkpoint_id or cur.checkpoint_id,
        tier=ev.tier or cur.tier,
    )
