"""Following a KV bucket: apply what it holds now, then every change as the server pushes it.

I/O helpers only (the scaler's specs and catalog, the gateway's specs and replicas); what a value
means is the caller's `apply(key, value_or_None)`, a delete or purge arriving as None.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.js.kv import KeyValue

Apply = Callable[[str, bytes | None], None]


async def kv_snapshot(w: KeyValue.KeyWatcher, apply: Apply, timeout_s: float = 10.0) -> None:
    """Apply what the bucket holds now; the watcher's None marks the end of it."""
    while True:
        entry = await w.updates(timeout=timeout_s)  # type: ignore[no-untyped-call]
        if entry is None:
            return
        apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)


async def kv_follow(w: KeyValue.KeyWatcher, apply: Apply) -> None:
    """Apply every later change until the watcher stops (deletes and purges as None)."""
    async for entry in w:
        if entry is not None:
            apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)
