"""The simulator of this checkout beside the one of another commit: CPU per policy, rounds interleaved.

On the shared VM the load moves a whole `snapscale simulate` run by more than most changes to it
do, so both sides run the first hours of the default trace (10,000 deployments, 1,000 hosts x 8
GPUs, seed 1) in turns, each in its own process, and each side's best round is kept. The other
commit's `snapscale/` is taken from git; every round's results must be the same on both sides
(a digest of each policy's outcome), or this stops.

Run: .venv/bin/python bench/simulate_ab.py --against 51d9990 [--hours 2] [--rounds 3]
     [--policies zero-cold,tiers]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(hours: float, policies: list[str]) -> None:
    """Run the policies over the first `hours` of the default trace; print {policy: [cpu s, digest]}."""
    try:  # the compiled simulator where the tree has a current build (snapscale/simulate/native.py)
        from snapscale.simulate import native

        print(f"simulator: {native.activate()}", file=sys.stderr)
    except ImportError:
        pass
    from snapscale.scaler.config import ScalerConfig
    from snapscale.simulate.engine import Sim
    from snapscale.simulate.policies import POLICIES
    from snapscale.simulate.profile import Profile
    from snapscale.simulate.run import sample_deployments
    from snapscale.simulate.samples import samples
    from snapscale.simulate.trace import GenSpec, generate

    tr = generate(GenSpec(10_000, 1_000_000))
    tr.horizon_s = hours * 3600.0
    per = [samples(tr, d) for d in range(len(tr.names))]
    picked = sample_deployments(tr)
    out: dict[str, tuple[float, str]] = {}
    for p in POLICIES:
        if p.name not in policies:
            continue
        cfg = replace(ScalerConfig(), tick_s=5.0)
        sim = Sim(tr, per, p, Profile(), hosts=1000, gpus_per_host=8, sampled=picked, cfg=cfg)
        c0 = time.process_time()
        r = sim.run()
        cpu = time.process_time() - c0
        seen: list[object] = [r.gpu_s, r.timeouts, r.freezes, r.prefetches, r.store_bytes, r.unplaceable]
        seen.append(r.decisions)
        seen += [r.events, r.peak_gpus, sorted(r.restores.items()), list(r.waits), r.peaks, r.series]
        out[p.name] = (cpu, hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16])
    print(json.dumps(out))


def tree(rev: str, into: Path) -> Path:
    """`snapscale/` as of `rev`, unpacked under `into`."""
    tar = subprocess.run(
        ["git", "archive", rev, "snapscale"], cwd=REPO, check=True, capture_output=True
    ).stdout
    path = into / "tree.tar"
    path.write_bytes(tar)
    with tarfile.open(path) as t:
        t.extractall(into, filter="data")
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="the other commit (git rev)")
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default="keepalive-10m,keepalive-20m,zero-cold,tiers,tiers-prefetch")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    policies = args.policies.split(",")
    if args.child:
        child(args.hours, policies)
        return
    if not args.against:
        ap.error("--against REV is needed")
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"this": REPO, args.against: tree(args.against, Path(tmp))}
        best: dict[str, dict[str, float]] = {side: {} for side in sides}
        for n in range(args.rounds):
            digests: dict[str, dict[str, str]] = {}
            for side, root in sides.items():
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--hours",
                    str(args.hours),
                    "--policies",
                    args.policies,
                ]
                env = {**os.environ, "PYTHONPATH": str(root)}
                proc = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                got = json.loads(proc.stdout)
                if n == 0:
                    ran = [ln for ln in proc.stderr.splitlines() if ln.startswith("simulator: ")]
                    print(f"{side}: {ran[0] if ran else 'simulator: interpreted (no native.py)'}")
                digests[side] = {p: d for p, (_cpu, d) in got.items()}
                for p, (cpu, _d) in got.items():
                    best[side][p] = min(cpu, best[side].get(p, cpu))
                print(f"round {n + 1} {side}: " + " ".join(f"{p} {c:.2f}s" for p, (c, _d) in got.items()))
            if len({json.dumps(d, sort_keys=True) for d in digests.values()}) != 1:
                sys.exit(f"the results differ: {digests}")
        for side in sides:
            each = ", ".join(f"{p} {c:.2f}" for p, c in best[side].items())
            print(f"best {side}: {sum(best[side].values()):.2f}s CPU ({each})")
        this, other = (sum(best[s].values()) for s in sides)
        print(f"this / {args.against}: {this / other:.3f}; results identical")


if __name__ == "__main__":
    main()
