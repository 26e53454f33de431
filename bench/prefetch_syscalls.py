"""Investigation only: system calls per GB made by the prefetch client's event-loop thread and by its
other threads, under strace, for a plain download and for the Prefetcher with its landing cut down.
Futex calls on the event-loop thread are mostly GIL handoffs with the landing threads; counts, not
timings, so a small shared machine gives them too. Needs strace and ptrace rights.
Usage: python -m bench.prefetch_syscalls [--mib 256] [--par 8] [--reps 2] [VARIANT ...]"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import os
import re

import bench.prefetch as bp
from bench.prefetch_alloc import LeanCache, blocks_as_received
from bench.prefetch_isolate import Partial

CALLS = "futex,epoll_wait,epoll_pwait,read,recvfrom,write,writev,brk,mmap,munmap"
CUT = {"neither": (False, False), "hash": (True, False), "write": (False, True)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    what = "plain, prefetch, lean (LeanCache), blocks, or neither/hash/write (Prefetcher landing that much)"
    default = ["plain", "prefetch", "neither", "hash", "write"]
    ap.add_argument("variants", nargs="*", default=default, help=what)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--par", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    async with bp.moto_with_image(a.mib) as (_moto_pid, ep, m, work):
        ds = sorted(m.digests())
        gb = a.reps * m.unique_bytes / 1e9
        for v in a.variants:
            out = work / f"strace-{v}.txt"
            tracer = await asyncio.create_subprocess_exec(
                "strace", "-f", "-qq", "-T", "-p", str(os.getpid()), "-o", str(out), "-e", f"trace={CALLS}"
            )  # fmt: skip
            await asyncio.sleep(1.0)  # attached to every thread by now
            for _ in range(a.reps):
                if v == "plain":
                    await bp.plain_download(ep, "p", ds, a.par)
                elif v == "blocks":
                    await blocks_as_received(ep, m, work, a.par)
                elif v == "lean":
                    await bp.prefetch_once(ep, "p", m, work, a.par, LeanCache)
                elif v == "prefetch":
                    await bp.prefetch_once(ep, "p", m, work, a.par)
                else:
                    cache = functools.partial(Partial, hash_=CUT[v][0], write=CUT[v][1])
                    await bp.prefetch_once(ep, "p", m, work, a.par, cache)
            tracer.terminate()
            await tracer.wait()
            loop_calls: collections.Counter[str] = collections.Counter()
            other: collections.Counter[str] = collections.Counter()
            futex_wait_s = 0.0
            for line in out.read_text().splitlines():
                hit = re.match(r"(\d+)\s+(\w+)\(", line)
                if hit is None:
                    continue
                on_loop = int(hit.group(1)) == os.getpid()
                (loop_calls if on_loop else other)[hit.group(2)] += 1
                took = re.search(r"<([0-9.]+)>$", line)
                if on_loop and hit.group(2) == "futex" and took is not None:
                    futex_wait_s += float(took.group(1))
            per_gb = {k: round(n / gb) for k, n in sorted(loop_calls.items())}
            print(f"{v:9} event-loop thread, calls/GB {per_gb}; in futex {futex_wait_s / gb:.3f} s/GB")
            print(
                f"{'':9} other threads, calls/GB { ({k: round(n / gb) for k, n in sorted(other.items())}) }"
            )


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
