"""Investigation only (not a bench): where the prefetch client spends its main thread on the GPU
machine. py-spy samples this process while it runs plain downloads, then prefetches; then plain vs
prefetch side by side with a shorter GIL switch interval."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import bench.prefetch as bp


async def main() -> None:
    out = Path(sys.argv[1])
    async with bp.moto_with_image(1024) as (_moto_pid, ep, m, work):
        ds = sorted(m.digests())
        probes: list[tuple[str, Callable[[], Awaitable[bp.Sample]], str]] = [
            ("plain", lambda: bp.plain_download(ep, "p", ds, 8), "--idle"),
            ("prefetch", lambda: bp.prefetch_once(ep, "p", m, work, 8), "--idle"),
            ("plain-gil", lambda: bp.plain_download(ep, "p", ds, 8), "--gil"),
            ("prefetch-gil", lambda: bp.prefetch_once(ep, "p", m, work, 8), "--gil"),
        ]
        for name, fn, how in probes:
            spy = await asyncio.create_subprocess_exec(
                os.environ.get("PYSPY", "py-spy"), "record", "--format", "raw", "--threads", how,
                "--nonblocking", "-r", "250", "-d", "10", "-p", str(os.getpid()),
                "-o", str(out / f"spy-{name}.txt"),
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )  # fmt: skip
            await asyncio.sleep(1.0)  # py-spy attaches
            t0, n, rates = time.monotonic(), 0, []
            while time.monotonic() - t0 < 8:
                rates.append((await fn()).bps / 1e6)
                n += 1
            await asyncio.wait_for(spy.wait(), 30)
            print(f"{name}: {n} runs under py-spy, MB/s {[round(r) for r in rates]}", flush=True)
        for interval in (0.005, 0.0005, 0.005, 0.0005):
            sys.setswitchinterval(interval)
            pl = [(await bp.plain_download(ep, "p", ds, 8)).bps / 1e6 for _ in range(2)]
            pf = [(await bp.prefetch_once(ep, "p", m, work, 8)).bps / 1e6 for _ in range(2)]
            print(f"switchinterval {interval}: plain {max(pl):.0f} prefetch {max(pf):.0f} MB/s "
                  f"ratio {max(pf) / max(pl):.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
