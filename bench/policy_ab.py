"""decide() of this checkout beside decide() of another commit, in one process, rounds interleaved.

On a shared machine the load moves between two runs of bench/scaler.py by more than a change to
the policy does; interleaving both sides' rounds in one process and taking each side's best
round compares them under the same load. The other commit's policy.py is loaded from git; both
get the same windows, samples and `current` counts.

Run: .venv/bin/python bench/policy_ab.py --against 75aa706 [--deployments 5000] [--rounds 8] [--repeat 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from snapscale.shared.bus.spec import ScalingSpec

REPO = Path(__file__).resolve().parent.parent


def load_policy(rev: str | None) -> ModuleType:
    """snapscale/scaler/policy.py as of `rev` (None: this checkout) as its own module."""
    if rev is None:
        path = REPO / "snapscale" / "scaler" / "policy.py"
    else:
        src = subprocess.run(
            ["git", "show", f"{rev}:snapscale/scaler/policy.py"], cwd=REPO, check=True, capture_output=True
        ).stdout
        fd, name = tempfile.mkstemp(suffix=".py", prefix="policy_")
        os.write(fd, src)
        os.close(fd)
        path = Path(name)
    spec = importlib.util.spec_from_file_location(f"policy_{rev or 'here'}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if rev is not None:
        path.unlink()
    return mod


def best_rounds(policy: ModuleType, deployments: int, rounds: int) -> tuple[float, float, float, float]:
    """(decide() alone, record() + decide()) per second, each the best of `rounds` rounds, then
    the same over all rounds together (as bench/scaler.py counts)."""
    spec = ScalingSpec()
    rng = random.Random(7)
    windows = [policy.Window(spec, 0.0) for _ in range(deployments)]
    for w in windows:
        for s in range(60):
            w.record(s + 0.5, rng.uniform(0, 20), 1)
    current = [rng.randint(1, 10) for _ in range(deployments)]
    now = 60.0
    best_decide = best_both = t_decide = t_both = 0.0
    for _ in range(rounds):
        now += 1.0
        t0 = time.perf_counter()
        for w in windows:
            w.record(now, 5.0, 1)
        t1 = time.perf_counter()
        for i, w in enumerate(windows):
            policy.decide(w, spec, current[i], now + 0.5)
        t2 = time.perf_counter()
        best_decide = max(best_decide, deployments / (t2 - t1))
        best_both = max(best_both, deployments / (t2 - t0))
        t_decide += t2 - t1
        t_both += t2 - t0
    n = deployments * rounds
    return best_decide, best_both, n / t_decide, n / t_both


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--against", required=True, help="the commit whose policy.py to compare with")
    p.add_argument("--deployments", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeat", type=int, default=4, help="times each side runs, interleaved")
    args = p.parse_args()
    sides = {"this checkout": load_policy(None), args.against: load_policy(args.against)}
    runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in sides}
    print(f"# load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for _ in range(args.repeat):
        for name, mod in sides.items():
            runs[name].append(best_rounds(mod, args.deployments, args.rounds))
    for name, r in runs.items():
        print(
            f"{name}: best round {max(x[0] for x in r):,.0f} decide()/s, "
            f"{max(x[1] for x in r):,.0f} (record + decide)/s; all rounds (median of {len(r)}) "
            f"{statistics.median(x[2] for x in r):,.0f} decide()/s, "
            f"{statistics.median(x[3] for x in r):,.0f} (record + decide)/s"
        )
    print(f"# load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
