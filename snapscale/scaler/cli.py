"""The scaler's subcommands for the `snapscale` CLI: `scaler` (the service) and `traffic` (a
generator of traffic events). Thin: parse, build Settings once, run, exit code.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.traffic import parse_duration, play
from snapscale.shared.core import runtime, telemetry
from snapscale.shared.core.settings import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
    p = sub.add_parser("scaler", help="run the scaler service (several may run; one leads)")
    p.add_argument("--tick-s", type=float, default=1.0, help="seconds between policy ticks (default 1)")
    p.add_argument("--lease-s", type=float, default=3.0, help="leader lease; a standby takes over after it")
    p.set_defaults(func=_scaler)

    t = sub.add_parser("traffic", help="publish traffic events for a deployment (stops by itself)")
    t.add_argument("deployment")
    t.add_argument("--rps", type=float, default=1.0, help="requests arriving per second")
    t.add_argument("--concurrency", type=float, default=1.0, help="requests in flight + queued to report")
    t.add_argument("--for", dest="duration", default="30s", help="how long, e.g. 30s, 2m (default 30s)")
    t.add_argument("--events-per-s", type=float, default=None, help="report rate (default min(rps, 20))")
    t.set_defaults(func=_traffic)


def _scaler(args: argparse.Namespace) -> int:
    from snapscale.scaler.service import Scaler

    s = Settings.from_env()
    runtime.setup_logging(s.log_level)
    cfg = ScalerConfig(tick_s=args.tick_s, lease_s=args.lease_s)
    return runtime.serve(
        f"{s.service_name}-scaler", s.otlp_endpoint, Scaler(s, cfg).run, metrics_address=s.metrics_address
    )


def _traffic(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    duration = parse_duration(args.duration)
    telemetry.setup(f"{s.service_name}-traffic", s.otlp_endpoint)
    try:
        n = asyncio.run(
            play(
                s,
                args.deployment,
                rps=args.rps,
                concurrency=args.concurrency,
                duration_s=duration,
                events_per_s=args.events_per_s,
            )
        )
    finally:
        telemetry.shutdown()
    print(f"published {n} traffic events for {args.deployment} over {duration:g}s")
    return 0
