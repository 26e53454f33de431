"""Checkpoint ids: sortable by creation time, unique across hosts without coordination.

Pure given its inputs; the caller passes the clock and the random suffix source.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable

# UTC to the millisecond, then 6 hex digits: 2026-11-28 00:35:12.345 -> 20261128T003512345Z-1a2b3c.
# Fixed width, so lexical order is time order; no dots, so an id is one NATS token and one S3 key part.
_ID = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{6}$")


def new_checkpoint_id(now: float | None = None, rand: Callable[[int], str] = secrets.token_hex) -> str:
    t = time.time() if now is None else now
    ms = round(t * 1000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000))
    return f"{stamp}{ms % 1000:03d}Z-{rand(3)}"


def is_checkpoint_id(value: str) -> bool:
    return bool(_ID.match(value))
