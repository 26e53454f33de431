"""Leader election for scaler instances: one lease key in KV `leases`, written with compare-and-set.

No clocks are compared across machines: a standby takes over when it has seen the same lease
revision for `lease_s` of its own monotonic time; a leader stops acting before that can happen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from snapscale.shared import bus
from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError, RetryableError

log = logging.getLogger(__name__)

LEASE_KEY = "scaler.leader"
LEASE_TYPE = "scaler-lease"


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    term: int  # bumps on every change of leader: a log line per term tells who led when
    ts: float  # the writer's wall clock, for operators only; never compared


class Lease:
    """This instance's view of the scaler lease. Call `step()` every `lease_s / 3` seconds."""

    def __init__(
        self, kv: KeyValue, holder: str, lease_s: float, mono: Callable[[], float] = time.monotonic
    ) -> None:
        self.kv = kv
        self.holder = holder
        self.lease_s = lease_s
        self.mono = mono
        self.term = 0
        self._rev: int | None = None  # the revision we wrote last, while we lead
        self._renewed_at = -1e18  # monotonic start of our last successful write
        self._seen: tuple[int, float] | None = None  # another holder's revision and when we first saw it

    def valid(self) -> bool:
        """True while this instance may send commands. Ends before any standby can take over:
        the standby's clock for a revision starts after our write, ours before it."""
        return self._rev is not None and self.mono() - self._renewed_at < self.lease_s * 0.9

    async def step(self) -> bool:
        """Acquire, renew or watch the lease once; returns `valid()` afterwards."""
        started = self.mono()
        try:
            got = await bus.kv_get(self.kv, LEASE_KEY)
            if got is None:
                await self._write(None, self.term + 1, started)
                return self.valid()
            data, rev = got
            try:
                cur: LeaseRecord | None = wire.decode(data, LeaseRecord, LEASE_TYPE)
            except MessageError as e:
                log.warning("lease %s unreadable (%s); treating it as held by nobody", LEASE_KEY, e)
                cur = None
            if cur is not None and cur.holder == self.holder:
                await self._write(rev, cur.term, started)
            elif self._seen is None or self._seen[0] != rev:
                self._seen = (rev, started)
                self._lost()
            elif started - self._seen[1] >= self.lease_s:
                log.info(
                    "lease held by %s unchanged for %.1fs: taking over", cur and cur.holder, self.lease_s
                )
                await self._write(rev, (cur.term if cur else self.term) + 1, started)
            else:
                self._lost()
        except (RetryableError, KeyWrongLastSequenceError) as e:
            log.info("lease: another instance wrote first (%s)", e)
            self._lost()
        except Exception as e:  # NATS down or slow: we cannot prove the lease, so we do not lead
            log.warning("lease: %s", e)
            if not self.valid():
                self._lost()
        return self.valid()

    async def _write(self, rev: int | None, term: int, started: float) -> None:
        rec = LeaseRecord(self.holder, term, time.time())
        new_rev = await bus.kv_cas(self.kv, LEASE_KEY, wire.encode(rec, LEASE_TYPE), rev)
        if self._rev is None:
            log.info("scaler %s leads (term %d)", self.holder, term)
        self._rev, self._renewed_at, self.term, self._seen = new_rev, started, term, None

    def _lost(self) -> None:
        if self._rev is not None:
            log.warning("scaler %s no longer leads (term %d)", self.holder, self.term)
        self._rev = None

    async def release(self) -> None:
        """Step down on a clean stop so a standby takes over at once instead of after `lease_s`."""
        if self._rev is None:
            return
        rev, self._rev = self._rev, None
        try:
            await self.kv.delete(LEASE_KEY, last=rev)
        except Exception as e:
            log.info("lease not released (%s): a standby will take over after it lapses", e)
