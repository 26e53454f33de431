"""`snapscale simulate`: replay a trace (generated, CSV or Azure Functions 2019) on a simulated
fleet under every policy; print the table, write the plots and JSON.

Every argument is checked before anything runs (exit 2 with the argument and why). Imports numpy
and matplotlib only when it runs, so the `snapscale` command works without them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from snapscale.shared.core.cliargs import duration, subcommand
from snapscale.shared.core.errors import ConfigError


def _bounded(kind: type[int] | type[float], lo: float, hi: float) -> argparse._ActionType:
    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"must be within [{lo:g}, {hi:g}], got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subcommand(
        sub,
        "simulate",
        "replay a day of traffic on a simulated GPU fleet under each scaling policy",
        "simulate",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--csv", type=Path, help="a trace: rows of timestamp,deployment,duration (seconds)")
    src.add_argument("--azure", type=Path, help="an Azure Functions 2019 invocations_per_function_md file")
    p.add_argument("--deployments", type=_bounded(int, 1, 1_000_000), default=10_000, help="generated trace")
    p.add_argument(
        "--requests", type=_bounded(int, 0, 10**9), default=1_000_000, help="generated trace, in all"
    )
    p.add_argument(
        "--zipf", type=_bounded(float, 0, 10), default=1.0, help="generated trace: popularity exponent"
    )
    p.add_argument("--horizon", type=duration, default=86400.0, help="generated trace: its length")
    p.add_argument("--seed", type=_bounded(int, 0, 2**32 - 1), default=1, help="of the generator and loaders")
    p.add_argument("--duration", type=duration, default=1.0, help="--azure: each invocation's service time")
    p.add_argument(
        "--image-gib", type=_bounded(float, 0.001, 1024), default=2.35, help="--csv/--azure: image size"
    )
    p.add_argument("--hosts", type=_bounded(int, 1, 100_000), default=1_000, help="GPU hosts in the fleet")
    p.add_argument("--gpus-per-host", type=_bounded(int, 1, 64), default=8, help="GPUs on each host")
    p.add_argument("--tick", type=duration, default=5.0, help="the scaler's tick (snapscale scaler --tick)")
    p.add_argument(
        "--no-checkpoints",
        dest="checkpoints",
        action="store_false",
        help="start with an empty catalog (the fleet's first day); by default every deployment has one",
    )
    p.add_argument("--profile", type=Path, help="TOML overriding the tier timings (docs/fleet.md)")
    p.add_argument("--out", type=Path, help="write fleet.json and the plots (PNG and SVG) here")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if not 1.0 <= args.horizon <= 30 * 86400.0:
        raise ConfigError(f"--horizon: must be within 1s and 30 days, got {args.horizon:g}s")
    if not 0.05 <= args.tick <= 60.0:
        raise ConfigError(f"--tick: must be within 50ms and 1m, got {args.tick:g}s")
    if not 0.0 < args.duration <= 86400.0:
        raise ConfigError(f"--duration: must be above 0 and at most 1 day, got {args.duration:g}s")
    for name in ("csv", "azure", "profile"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{name}: {path}: no such file")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from snapscale.simulate import native

    simulator = native.activate()  # before the compiled modules' first import
    try:
        from snapscale.simulate import report, trace
        from snapscale.simulate.profile import load_profile
        from snapscale.simulate.run import compare
    except ImportError as e:
        raise ConfigError(
            f"simulate needs numpy and matplotlib: pip install 'snapscale[simulate]' ({e})"
        ) from e
    profile = load_profile(args.profile)
    if args.csv is not None:
        tr = trace.load_csv(args.csv, image_gib=args.image_gib)
    elif args.azure is not None:
        tr = trace.load_azure(args.azure, duration_s=args.duration, image_gib=args.image_gib, seed=args.seed)
    else:
        g = trace.GenSpec(args.deployments, args.requests, args.zipf, horizon_s=args.horizon, seed=args.seed)
        tr = trace.generate(g)
    print(f"simulate: the simulator runs {simulator}", file=sys.stderr)
    t0 = time.perf_counter()

    def show(policy: str, done: float, total: float) -> None:
        took = time.perf_counter() - t0
        print(
            f"simulate: {policy} at {done / 3600:.1f} h of {total / 3600:.1f} h, {took:.0f}s", file=sys.stderr
        )

    c = compare(
        tr,
        profile,
        hosts=args.hosts,
        gpus_per_host=args.gpus_per_host,
        tick_s=args.tick,
        checkpoints=args.checkpoints,
        progress=show,
    )
    wall = time.perf_counter() - t0
    doc = report.document(c)
    events = sum(r.events + r.decisions for r in c.results)
    doc["wall_s"] = wall
    doc["simulator"] = simulator
    doc["events_per_s"] = events / wall if wall > 0 else 0.0
    if args.out is not None:
        report.plots(doc, args.out)
        (args.out / "fleet.json").write_text(json.dumps(doc, indent=1, allow_nan=False, default=str) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
        return 0
    print(report.text(c))
    print(f"{c.deployments:,} deployments, {c.requests:,} requests, {c.hosts:,} hosts x "
          f"{c.gpus_per_host} GPUs, {c.horizon_s / 3600:.1f} h, tick {c.tick_s:g}s: "
          f"{wall:.0f}s of simulation "
          f"({events / wall if wall else 0:,.0f} events/s: decisions + timed events), "
          f"peak memory {c.peak_rss_bytes / 2**20:,.0f} MiB")  # fmt: skip
    return 0
