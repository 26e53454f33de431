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


def _git_source(rev: str, rel: str) -> bytes | None:
    r = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=REPO, capture_output=True, check=False)
    return r.stdout if r.returncode == 0 else None


def _module(name: str, src: bytes) -> ModuleType:
    fd, path = tempfile.mkstemp(suffix=".py", prefix=f"{name}_")
    os.write(fd, src)
    os.close(fd)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        os.unlink(path)


def load_policy(rev: str | None) -> ModuleType:
    """snapscale/scaler/policy.py as of `rev` (None: this checkout) as its own module, with that
    commit's `Window`: inside policy.py until it moved to window.py, from that commit's window.py
    since (put in place of this checkout's while policy.py is loaded)."""
    if rev is None:
        return _module("policy_here", (REPO / "snapscale" / "scaler" / "policy.py").read_bytes())
    src = _git_source(rev, "snapscale/scaler/policy.py")
    assert src is not None, f"{rev} has no snapscale/scaler/policy.py"
    window = _git_source(rev, "snapscale/scaler/window.py")
    key = "snapscale.scaler.window"
    saved = sys.modules.get(key)
    try:
        if window is not None:
            sys.modules[key] = _module(f"window_{rev}", window)
        return _module(f"policy_{rev}", src)
    finally:
        if saved is not None:
            sys.modules[key] = saved
        else:
            sys.modules.pop(key, None)


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
