"""The answer to a scale-up command the decoder refused: it never reaches the ledger or a path;
when it names a replica the scaler placed on this host and is waiting for, that replica is
reported failed with the refusal, so the scaler places it again now rather than after its
ready timeout. Anything else of the command is untrusted and only logged (by the consumer).
"""

from __future__ import annotations

import asyncio
import logging

from snapscale.restorer import events
from snapscale.restorer.host import Host
from snapscale.shared.bus import ReplicaEvent, ReplicaState, ScaleUpCommand, salvage
from snapscale.shared.core.errors import MessageError

log = logging.getLogger(__name__)
# the scaler writes the pending record beside the command, not before it: a refusal quicker than
# that write looks again this often, for this long
PLACED_POLL_S = 0.1
PLACED_WAIT_S = 1.0


async def refused_scale_up(h: Host, data: bytes, e: MessageError) -> ReplicaEvent | None:
    """Report the replica a refused scale-up names failed, when that is safe; the event, or None.

    Safe means: its deployment and replica ids pass their own limits, and KV `replicas` has it
    pending on this host (placed here, not yet taken on). A replica that runs, or that another
    host or nobody holds, is left alone: a bad command must not fail what it did not start.
    """
    t = h.tools
    ids = salvage(data, ScaleUpCommand, ("deployment", "replica", "id"))
    deployment, replica = ids.get("deployment"), ids.get("replica")
    if deployment is None or replica is None:
        return None
    if replica in h.replicas.live or replica in h.replicas.starting:
        return None
    last, _rev = await events.current(t.bus, deployment, replica)
    for _ in range(round(PLACED_WAIT_S / PLACED_POLL_S)):
        if last is not None:
            break
        await asyncio.sleep(PLACED_POLL_S)
        last, _rev = await events.current(t.bus, deployment, replica)
    if last is None or last.host != t.name or last.state is not ReplicaState.PENDING:
        return None
    reason = f"scale-up command refused: {e.field}: {e.reason}"
    ev = events.event(t, deployment, replica, ReplicaState.FAILED, command_id=ids.get("id"), reason=reason)
    await events.record(t.bus, ev)
    return ev
