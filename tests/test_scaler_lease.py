"""The leader lease on a real KV bucket, with each instance's monotonic clock moved by hand."""

from __future__ import annotations

from snapscale.scaler.lease import LEASE_KEY, Lease
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.subjects import Bucket


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_one_leads_a_standby_takes_over_only_after_the_lease_lapses(the_bus: Bus) -> None:
    kv = the_bus.kv[Bucket.LEASES]
    ca, cb = Clock(), Clock()
    a, b = Lease(kv, "a", 3.0, mono=ca), Lease(kv, "b", 3.0, mono=cb)
    assert await a.step()
    assert not await b.step()  # b sees a's revision for the first time
    # a renews every second: b never sees one revision for 3 s
    for _ in range(6):
        ca.t += 1.0
        cb.t += 1.0
        assert await a.step()
        assert not await b.step()
    # a stops renewing (dead, or cut off): it stops acting before b may start
    ca.t += 2.7
    assert not a.valid()  # 0.9 x 3 s after its last renewal
    cb.t += 2.9
    assert not await b.step()  # 2.9 s of the same revision: not yet
    cb.t += 0.2
    assert await b.step()
    assert b.term == a.term + 1
    # a comes back: it finds b's lease and does not lead
    ca.t += 1.0
    assert not await a.step()
    assert not a.valid()


async def test_a_clean_release_hands_over_at_once(the_bus: Bus) -> None:
    kv = the_bus.kv[Bucket.LEASES]
    a, b = Lease(kv, "a", 3.0, mono=Clock()), Lease(kv, "b", 3.0, mono=Clock())
    assert await a.step()
    assert not await b.step()
    await a.release()
    assert not a.valid()
    assert await b.step()  # no waiting for the lease to lapse


async def test_two_racing_for_a_free_lease_one_wins(the_bus: Bus) -> None:
    import asyncio

    kv = the_bus.kv[Bucket.LEASES]
    leases = [Lease(kv, f"s{i}", 3.0, mono=Clock()) for i in range(4)]
    won = await asyncio.gather(*(x.step() for x in leases))
    assert sum(won) == 1
    got = await kv.get(LEASE_KEY)
    assert got.value is not None and f'"s{won.index(True)}"'.encode() in got.value
