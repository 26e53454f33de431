"""netns.create (engine/netns.py) timed on an idle event loop and on a busy one (a task holding
the loop 5 ms at a time, as a prefetch beside a restore does), each round a create then a delete.
Run 10's store tier (one H200) spent ~0.57 s of its engine restore outside every step, where the
netns was made while the weights' prefetch ran on the same loop.

Usage (root): python -m bench.netns [--rounds 8] [--hold-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from snapscale.shared.engine import netns


async def _hold(stop: asyncio.Event, hold_s: float) -> None:
    while not stop.is_set():
        t = time.monotonic()
        while time.monotonic() - t < hold_s:
            pass
        await asyncio.sleep(0)


async def rounds(n: int, hold_s: float | None) -> list[float]:
    """Seconds per create; with `hold_s`, beside a task holding the loop that long at a time."""
    stop = asyncio.Event()
    busy = asyncio.create_task(_hold(stop, hold_s)) if hold_s else None
    out = []
    try:
        for i in range(n):
            t = time.monotonic()
            ns = await netns.create(f"bench-netns-{i}")
            out.append(time.monotonic() - t)
            await netns.delete_netns(ns.name)
    finally:
        stop.set()
        if busy is not None:
            await busy
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--hold-ms", type=float, default=5.0)
    a = p.parse_args()
    for label, hold in (("idle loop", None), (f"loop held {a.hold_ms:g} ms at a time", a.hold_ms / 1000)):
        ts = await rounds(a.rounds, hold)
        print(f"netns.create, {label}: median {statistics.median(ts):.4f} s, max {max(ts):.4f} s")


if __name__ == "__main__":
    asyncio.run(main())
