"""Does a memory cgroup slow a restore's page reads? CRIU's restorer maps a VMA and reads the
image's pages into it (preadv from the pages file, the page cache's copy); each fresh page is
charged to the memory cgroup of the process that faults it in. A runc container's processes sit in
a cgroup of their own with the memory controller on (`sandbox.memory_mib`); the host sandbox's sit
wherever the restorer runs. This reads one file of `--gib` GiB into fresh anonymous memory, as
the restorer does, in a child process placed in turn: in this process's cgroup, in a new memory
cgroup without a limit, and in one with `--limit-gib` as its limit (the OCI bench's 96 GiB); the
order rotates each round, and each kind's median is printed with its ratio to the first.

Needs root and a writable cgroup hierarchy (v2, or v1's memory controller); from the repo root:
`python3 -m bench.memcg_pages --work DIR [--gib 2] [--rounds 5] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path
from typing import Any

V2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
MEMCG_ROOT = Path("/sys/fs/cgroup") if V2 else Path("/sys/fs/cgroup/memory")
PARENT = "snapscale-bench-memcg"
CHUNK = 64 << 20


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def own_cgroup() -> str:
    """This process's cgroup, as /proc/self/cgroup names it (v2: the one `0::` line)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        num, ctrls, path = line.split(":", 2)
        if (V2 and num == "0") or (not V2 and "memory" in ctrls.split(",")):
            return path
    return "/"


def memory_on(cg: str) -> bool:
    """Whether the memory controller accounts `cg` (v2: enabled in its parent's subtree)."""
    if not V2:
        return True
    if cg == "/":
        return False  # the root cgroup is not charged
    parent = (MEMCG_ROOT / cg.lstrip("/")).parent
    return "memory" in (parent / "cgroup.subtree_control").read_text().split()


def make_cgroup(name: str, limit: int | None) -> Path:
    """A cgroup under MEMCG_ROOT/PARENT with the memory controller on (v2: enabled in the root's and
    the parent's subtree, as runc does for its containers)."""
    parent = MEMCG_ROOT / PARENT
    parent.mkdir(exist_ok=True)
    if V2:
        for d in (MEMCG_ROOT, parent):
            (d / "cgroup.subtree_control").write_text("+memory")
    cg = parent / name
    cg.mkdir(exist_ok=True)
    if limit is not None:
        (cg / ("memory.max" if V2 else "memory.limit_in_bytes")).write_text(str(limit))
    return cg


def read_pages(path: Path, size: int, into: Path | None) -> float:
    """In a forked child (placed in `into` first): map `size` anonymous bytes and read the file into
    them, as CRIU's restorer does; seconds the reads took."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            if into is not None:
                (into / "cgroup.procs").write_text(str(os.getpid()))
            mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            view = memoryview(mem)
            fd = os.open(path, os.O_RDONLY)
            s = time.perf_counter()
            off = 0
            while off < size:
                n = os.preadv(fd, [view[off : off + CHUNK]], off)
                if n <= 0:
                    break
                off += n
            took = time.perf_counter() - s
            os.write(w, f"{took}".encode())
        finally:
            os._exit(0)
    os.close(w)
    took = float(os.read(r, 64).decode() or "nan")
    os.close(r)
    os.waitpid(pid, 0)
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/memcg-pages-work", help="where the pages file is written")
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--limit-gib", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root: it makes cgroups")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.gib * (1 << 30)) // mmap.PAGESIZE * mmap.PAGESIZE
    pages = work / "pages.img"
    with open(pages, "wb") as f:  # non-zero bytes, so no page is shared
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    size = pages.stat().st_size
    mine = own_cgroup()
    kinds: dict[str, Path | None] = {
        "own_cgroup": None,
        "memcg_no_limit": make_cgroup("nolimit", None),
        "memcg_limit": make_cgroup("limit", args.limit_gib << 30),
    }
    read_pages(pages, size, None)  # warm the page cache
    times: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for n in range(args.rounds):
        order = names[n % len(names) :] + names[: n % len(names)]
        for k in order:
            times[k].append(read_pages(pages, size, kinds[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    res: dict[str, Any] = {
        "cgroup_version": 2 if V2 else 1, "own_cgroup": mine, "own_cgroup_charged": memory_on(mine),
        "bytes": size, "times_s": times, "median_s": med,
        "gb_per_s": {k: round(size / v / 1e9, 3) for k, v in med.items()},
        "over_own": {k: round(v / med["own_cgroup"], 3) for k, v in med.items()},
    }  # fmt: skip
    for cg in (kinds["memcg_no_limit"], kinds["memcg_limit"]):
        assert cg is not None
        cg.rmdir()
    (MEMCG_ROOT / PARENT).rmdir()
    pages.unlink()
    say(json.dumps(res))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "memcg_pages.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
