"""drop_zero_pages (engine/zeropages.py) on a real CRIU image, then the freezer's chunking of the
result (store/chunking.py scan_image), by the number of threads the pass uses: a child holding
`--zero-mib` of written zero pages and `--data-mib` of random bytes is dumped once into a tmpfs,
and each run compacts a fresh copy of that image, then chunks it.

With `--baseline REV` the same runs go through the drop_zero_pages of git revision REV too (read
with `git show`, or from a file of that name, in the same process, on copies of the same image),
side by side: the two must leave byte-identical images. `pass` is drop_zero_pages, `chunk` the
scan_image after it; `scan` and `compact` split the pass (this tree's pass only). Ratios, not
absolute times, carry across machines.

Usage (root, CRIU as the engine finds it, or SNAPSCALE_CRIU): python -m bench.zero_pages
[--zero-mib 300] [--data-mib 200] [--workers 1,2,8] [--reps 3] [--baseline da9aef0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from snapscale.shared.engine import zeropages
from snapscale.shared.engine.criu import find_criu
from snapscale.shared.store.chunking import scan_image

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

Pass = Callable[[Path, int], object]


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


def baseline_pass(rev: str) -> Pass:
    """drop_zero_pages as it was at git revision `rev` (this checkout's history), or in the file
    `rev` (a machine without the history: `git show` the module there, pages.py before zeropages.py)."""
    if Path(rev).is_file():
        src = Path(rev).read_text()
    else:  # zeropages.py since it left pages.py
        for name in ("zeropages.py", "pages.py"):
            got = subprocess.run(["git", "show", f"{rev}:snapscale/shared/engine/{name}"],
                                 capture_output=True, text=True)  # fmt: skip
            if got.returncode == 0 and "def drop_zero_pages" in got.stdout:
                break
        else:
            sys.exit(f"no drop_zero_pages at {rev}")
        src = got.stdout
    mod = types.ModuleType("pages_baseline")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"drop_zero_pages@{rev}", "exec"), mod.__dict__)  # our own history, not input
    return mod.drop_zero_pages  # type: ignore[no-any-return]


def image_digest(image: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(image.glob("pages*.img")) + sorted(image.glob("pagemap*.img")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zero-mib", type=int, default=300)
    ap.add_argument("--data-mib", type=int, default=200)
    ap.add_argument("--workers", default="1,2,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", default="", help="a git revision or a file: its drop_zero_pages beside")
    a = ap.parse_args()
    passes: dict[str, Pass] = {"this tree": zeropages.drop_zero_pages}
    if a.baseline:
        passes = {f"at {a.baseline}": baseline_pass(a.baseline), **passes}
    work = Path(tempfile.mkdtemp(prefix="zero-pages-", dir="/dev/shm"))
    took: dict[tuple[str, int], list[tuple[float, float]]] = {}
    digests: set[str] = set()
    try:
        dump(work / "image", a.zero_mib, a.data_mib)
        for rep in range(a.reps):
            for w in [int(x) for x in a.workers.split(",")]:
                for name, run in passes.items():
                    copy = work / f"copy-{rep}-{w}"
                    shutil.copytree(work / "image", copy)
                    t = time.monotonic()
                    r = run(copy, w)
                    t_pass = time.monotonic() - t
                    scan = scan_image(copy)
                    t_chunk = time.monotonic() - t - t_pass
                    took.setdefault((name, w), []).append((t_pass, t_chunk))
                    split = ""
                    if isinstance(r, zeropages.DropReport):
                        split = f" (scan {r.scan_s:.3f}, compact {r.compact_s:.3f})"
                    before, after = r.bytes_before / 2**20, r.bytes_after / 2**20  # type: ignore[attr-defined]
                    print(f"{name}, workers {w}: pass {t_pass:.3f} s{split}, chunk {t_chunk:.3f} s, "
                          f"{before:.0f} MiB -> {after:.0f} MiB, "
                          f"{scan.total_bytes / 2**20:.0f} MiB chunked", flush=True)  # fmt: skip
                    digests.add(image_digest(copy))
                    shutil.rmtree(copy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"cpus: {os.cpu_count()}; images identical across passes: {len(digests) == 1}")
    for (name, w), ts in took.items():
        p, c = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"median {name}, workers {w}: pass {p:.3f} s + chunk {c:.3f} s = {p + c:.3f} s")
    if a.baseline:
        for w in [int(x) for x in a.workers.split(",")]:
            old = statistics.median(sum(t) for t in took[(f"at {a.baseline}", w)])
            new = statistics.median(sum(t) for t in took[("this tree", w)])
            print(f"workers {w}: pass + chunk, this tree / {a.baseline}: {new / old:.2f}")
    if len(digests) != 1:
        sys.exit("the passes left different images")


if __name__ == "__main__":
    main()
