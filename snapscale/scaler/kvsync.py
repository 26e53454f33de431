"""Following KV buckets: read a bucket's current values, then apply every change as it comes.

I/O helpers only; what a value means is the caller's `apply(key, value_or_None)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from snapscale.shared import bus

Apply = Callable[[str, bytes | None], None]


async def keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except NoKeysError:
        return []


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


async def snapshot(w: KeyValue.KeyWatcher, apply: Apply, timeout_s: float = 10.0) -> None:
    """Apply what the bucket holds now; the watcher's None marks the end of it."""
    while True:
        entry = await w.updates(timeout=timeout_s)  # type: ignore[no-untyped-call]
        if entry is None:
            return
        apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)


async def follow(w: KeyValue.KeyWatcher, apply: Apply) -> None:
    """Apply every later change until the watcher stops (deletes and purges as None)."""
    async for entry in w:
        if entry is not None:
            apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)
