"""The scaler's subcommand for the `snapscale` CLI: `scaler`, the service. Thin: parse, build
Settings once, run, exit code. (`snapscale traffic`, the operator's verb, is in snapscale/cli.)
"""

from __future__ import annotations

import argparse

from snapscale.scaler.config import ScalerConfig
from snapscale.shared.core import runtime
from snapscale.shared.core.cliargs import add_alias, duration, subcommand
from snapscale.shared.core.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
    p = subcommand(sub, "scaler", "run the scaler service (several may run; one leads)", "bus", "telemetry")
    p.add_argument("--tick", dest="tick_s", type=duration, default="1s", help="time between policy ticks")
    p.add_argument(
        "--lease", dest="lease_s", type=duration, default="3s", help="leader lease; a standby takes over then"
    )
    add_alias(p, "--tick-s", "tick_s", duration)
    add_alias(p, "--lease-s", "lease_s", duration)
    p.set_defaults(func=_scaler)


def _scaler(args: argparse.Namespace) -> int:
    from snapscale.scaler.service import Scaler

    s = Settings.from_env()
    runtime.setup_logging(s.log_level)
    cfg = ScalerConfig(tick_s=args.tick_s, lease_s=args.lease_s)
    return runtime.serve(
        f"{s.service_name}-scaler", s.otlp_endpoint, Scaler(s, cfg).run, metrics_address=s.metrics_address
    )
