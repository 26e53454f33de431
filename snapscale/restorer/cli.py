"""The restorer's subcommand for the `snapscale` CLI: `restorer`, the service for one host. Thin:
parse, run, exit. (`snapscale status`, the operator's view, is in snapscale/cli.)"""

from __future__ import annotations

import argparse

from snapscale.shared.core import runtime
from snapscale.shared.core.cliargs import add_alias, duration, size, subcommand
from snapscale.shared.core.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
    p = subcommand(
        sub, "restorer", "run the restorer for one host (restore, release, prefetch commands)",
        "bus", "store", "host", "restorer", "telemetry",
    )  # fmt: skip
    p.add_argument("--host", help="host id (default: SNAPSCALE_HOST_ID or the hostname)")
    p.add_argument(
        "--cpu-slots", type=int, help="replicas of CPU deployments at once (default: SNAPSCALE_CPU_SLOTS, 4)"
    )
    p.add_argument(
        "--suspend-budget", dest="suspend_budget_bytes", type=size,
        help="RAM suspended replicas may hold, e.g. 32GiB (default: SNAPSCALE_SUSPEND_BUDGET_BYTES, 32GiB)",
    )  # fmt: skip
    p.add_argument(
        "--heartbeat", dest="heartbeat_s", type=duration,
        help="inventory interval, e.g. 3s (default: SNAPSCALE_HEARTBEAT_S, 3s)",
    )  # fmt: skip
    p.add_argument(
        "--drain", dest="drain_s", type=duration,
        help="on SIGTERM, the time in-flight commands get (default: 20s)",
    )  # fmt: skip
    p.add_argument("--no-auto-freeze", action="store_true", help="never ask the freezer after a cold boot")
    p.add_argument(
        "--advertise-addr", help="this host's address for other machines: forward a port to each replica"
    )
    add_alias(p, "--suspend-budget-bytes", "suspend_budget_bytes", size)
    add_alias(p, "--heartbeat-s", "heartbeat_s", duration)
    add_alias(p, "--drain-s", "drain_s", duration)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from snapscale.restorer.config import RestorerConfig
    from snapscale.restorer.service import Restorer

    overrides: dict[str, object] = {"service_name": "snapscale-restorer"}
    if args.host:
        overrides["host_id"] = args.host
    settings = Settings.from_env(None, **overrides)
    runtime.setup_logging(settings.log_level)
    config = RestorerConfig.from_env(
        settings.host_id,
        cpu_slots=args.cpu_slots,
        suspend_budget_bytes=args.suspend_budget_bytes,
        heartbeat_s=args.heartbeat_s,
        drain_s=args.drain_s,
        auto_freeze=False if args.no_auto_freeze else None,
        advertise_addr=args.advertise_addr,
    )
    return runtime.serve(
        settings.service_name,
        settings.otlp_endpoint,
        Restorer(settings, config).run,
        metrics_address=settings.metrics_address,
    )
