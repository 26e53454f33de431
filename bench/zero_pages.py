"""drop_zero_pages (engine/pages.py) on a real CRIU image, by the number of threads it scans and
copies with: a child holding `--zero-mib` of written zero pages and `--data-mib` of random bytes is
dumped once into a tmpfs, and each run compacts a fresh copy of that image.

Usage (root, CRIU as the engine finds it): python -m bench.zero_pages [--zero-mib 300]
[--data-mib 200] [--workers 1,2,8] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from snapscale.shared.engine import pages
from snapscale.shared.engine.criu import find_criu

CHILD = r"""
import os, sys, time
zero = bytearray(int(sys.argv[2]) << 20)
for i in range(0, len(zero), 4096):
    zero[i] = 0  # written: CRIU dumps the page although it is all zeros
data = bytearray(os.urandom(int(sys.argv[3]) << 20))
open(sys.argv[1], "w").close()
while True:
    time.sleep(1)
"""


def dump(dest: Path, zero_mib: int, data_mib: int) -> None:
    criu = find_criu(os.environ.get("SNAPSCALE_CRIU"))
    ready = dest.parent / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(zero_mib), str(data_mib)],
                             start_new_session=True)  # fmt: skip
    try:
        while not ready.exists():
            time.sleep(0.05)
        dest.mkdir()
        subprocess.run([criu.path, "dump", "-t", str(child.pid), "-D", str(dest), "--shell-job",
                        "-o", "dump.log"], check=True)  # fmt: skip
    finally:
        child.kill()
        child.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zero-mib", type=int, default=300)
    ap.add_argument("--data-mib", type=int, default=200)
    ap.add_argument("--workers", default="1,2,8")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zero-pages-", dir="/dev/shm"))
    try:
        dump(work / "image", a.zero_mib, a.data_mib)
        for rep in range(a.reps):
            for w in [int(x) for x in a.workers.split(",")]:
                copy = work / f"copy-{rep}-{w}"
                shutil.copytree(work / "image", copy)
                t = time.monotonic()
                r = pages.drop_zero_pages(copy, w)
                took = time.monotonic() - t
                print(f"workers {w}: {took:.3f} s, {r.bytes_before / 2**20:.0f} MiB -> "
                      f"{r.bytes_after / 2**20:.0f} MiB", flush=True)  # fmt: skip
                shutil.rmtree(copy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
