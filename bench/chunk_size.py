"""What the chunk size changes on real CRIU images: dedup between two dumps of one process taken
a moment apart, zero bytes found, chunking+hashing speed, request count. Needs root and CRIU.

Run: .venv/bin/python bench/chunk_size.py [--mib 256]. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from snapscale.shared.engine.criu import find_criu
from snapscale.shared.store.chunking import scan_image

MiB = 1 << 20

# A process shaped like a model server: a big read-only blob (weights), zeroed buffers, and a
# small state that changes between the two dumps (a counter and a few touched pages).
CHILD = r"""
import os, sys, time
weights = bytearray(os.urandom(int(sys.argv[2]) << 20))
kv = bytearray(int(sys.argv[2]) << 18)
for i in range(0, len(kv), 4096):
    kv[i] = 0
state = bytearray(4 << 20)
open(sys.argv[1], "w").write("ready")
n = 0
while True:
    n += 1
    state[(n * 4096) % len(state)] = n % 256
    scratch = [bytes(100) for _ in range(1000)]
    time.sleep(0.001)
"""


def dump(criu: str, pid: int, d: Path) -> None:
    d.mkdir()
    subprocess.run(
        [criu, "dump", "-t", str(pid), "-D", str(d), "--leave-running", "-o", "dump.log"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="size of the child's random blob")
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    a = ap.parse_args()
    criu = find_criu().path
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        ready = work / "ready"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ready), str(a.mib)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            while not ready.exists():
                time.sleep(0.05)
            dump(criu, child.pid, work / "d1")
            time.sleep(1.0)
            dump(criu, child.pid, work / "d2")
        finally:
            child.kill()
            child.wait()
        total = sum(p.stat().st_size for p in (work / "d2").iterdir())
        print(f"two dumps of one process 1 s apart, {total / 1e6:.0f} MB each (CRIU {find_criu().version})\n")
        print("| chunk | chunks | zero MB | 2nd dump new MB (dedup vs 1st) | chunk+hash MB/s "
              "| files in 1 chunk |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|")
        for size in [int(x) for x in a.sizes.split(",")]:
            t0 = time.monotonic()
            s1 = scan_image(work / "d1", size * MiB)
            dt = time.monotonic() - t0
            s2 = scan_image(work / "d2", size * MiB)
            new = sum(src.length for d, src in s2.sources.items() if d not in s1.sources)
            single = sum(1 for f in s2.files if len(f.chunks) <= 1)
            print(f"| {size} MiB | {len(s2.sources)} | {s2.zero_bytes / 1e6:.0f} | {new / 1e6:.1f} "
                  f"({100 * new / max(1, s2.unique_bytes):.1f}% of unique) | {s1.total_bytes / dt / 1e6:.0f} "
                  f"| {single}/{len(s2.files)} |")  # fmt: skip


if __name__ == "__main__":
    main()
