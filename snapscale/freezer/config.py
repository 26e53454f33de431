"""The freezer's own settings (beside the shared `Settings`): ack wait, redeliveries, claim TTL, drain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FreezerConfig:
    ack_wait_s: float = 30.0  # a freeze outlives this: in_progress() every third of it
    max_deliver: int = 5
    claim_ttl_s: float = 120.0  # an auto-freeze claim outlives a dead holder by at most this
    drain_s: float = 300.0  # on stop, how long the freeze in flight may take to finish
    chunk_bytes: int | None = None  # None: the store's default
