"""Which deployment spec a running sandbox was started from: the KV `deployments` revision that
was current when it started, so a freeze after a redeploy is keyed by the spec it really runs.

`pick_revision` is pure; `spec_at` reads the key's history (the bucket keeps 5 revisions).
"""

from __future__ import annotations

import datetime

from nats.js.kv import KeyValue

from snapscale.shared.bus import DeploymentSpec, kv_history
from snapscale.shared.core.errors import ConfigError


class SpecUnknown(Exception):
    """No spec revision can be shown to be the one the sandbox runs."""


def pick_revision(revisions: list[tuple[float, bytes | None]], started_at: float) -> bytes:
    """The value current at `started_at` among (written_at, value or None for a delete), oldest first."""
    current: bytes | None = None
    seen = False
    for written_at, value in revisions:
        if written_at > started_at:
            break
        seen = True
        current = value
    if not seen:
        raise SpecUnknown("the spec history no longer reaches back to when the sandbox started")
    if current is None:
        raise SpecUnknown("the deployment had no spec when the sandbox started")
    return current


async def spec_at(kv: KeyValue, deployment: str, started_at: float) -> DeploymentSpec:
    history = await kv_history(kv, deployment)
    if not history:
        raise SpecUnknown(f"deployment {deployment} has no spec in KV 'deployments'")
    revisions = [(_seconds(e.created), e.value if e.operation is None else None) for e in history]
    data = pick_revision(revisions, started_at)
    try:
        return DeploymentSpec.from_json(data)
    except ConfigError as e:
        raise SpecUnknown(f"deployment {deployment}: spec unreadable: {e}") from None


def _seconds(created: object) -> float:
    # nats-py types Entry.created as int but fills it with the stream's datetime
    if isinstance(created, datetime.datetime):
        return created.timestamp()
    if isinstance(created, int | float):
        return created / 1e9 if created > 1e12 else float(created)
    return 0.0
