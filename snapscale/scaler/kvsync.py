"""Reading KV buckets whole: every key, every value (following one is `bus.kv_snapshot` and
`bus.kv_follow`).
"""

from __future__ import annotations

import asyncio

from nats.js.kv import KeyValue

from snapscale.shared import bus


async def keys(kv: KeyValue) -> list[str]:
    return await bus.kv_keys(kv)


async def values(kv: KeyValue, concurrency: int = 64) -> list[tuple[str, bytes, int]]:
    """(key, value, revision) of every key the bucket holds now, `concurrency` reads at a time
    (a fleet's worth of replicas read one by one would hold a new leader up for seconds)."""
    names = await keys(kv)
    out: list[tuple[str, bytes, int]] = []
    for i in range(0, len(names), concurrency):
        batch = names[i : i + concurrency]
        got = await asyncio.gather(*(bus.kv_get(kv, k) for k in batch))
        out.extend((k, g[0], g[1]) for k, g in zip(batch, got, strict=True) if g is not None)
    return out
