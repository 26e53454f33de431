"""The restorer's subcommands for the `snapscale` CLI: `restorer` (the service for one host) and
`status` (the operator's view of hosts, replicas, checkpoints and caches). Thin: parse, run, exit."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from snapscale.shared.core import runtime
from snapscale.shared.core.settings import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
    p = sub.add_parser("restorer", help="run the restorer for one host (restore, release, prefetch commands)")
    p.add_argument("--host", help="host id (default: SNAPSCALE_HOST_ID or the hostname)")
    p.add_argument("--cpu-slots", type=int, help="replicas of CPU deployments at once (SNAPSCALE_CPU_SLOTS)")
    p.add_argument("--suspend-budget-bytes", type=int, help="RAM suspended replicas may hold")
    p.add_argument("--heartbeat-s", type=float, help="inventory interval (SNAPSCALE_HEARTBEAT_S)")
    p.add_argument("--drain-s", type=float, help="on SIGTERM, time in-flight commands get (default 20)")
    p.add_argument("--no-auto-freeze", action="store_true", help="never ask the freezer after a cold boot")
    p.add_argument(
        "--advertise-addr", help="this host's address for other machines: forward a port to each replica"
    )
    p.set_defaults(func=_serve)

    s = sub.add_parser("status", help="hosts, replicas, checkpoints and host caches")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)


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


def _status(args: argparse.Namespace) -> int:
    from snapscale.restorer import status
    from snapscale.shared import bus

    settings = Settings.from_env()

    async def main() -> status.Status:
        b = await bus.open_bus(settings, "snapscale-status")
        try:
            return await status.gather(b)
        finally:
            await b.close()

    st = asyncio.run(main())
    sys.stdout.write((status.to_json(st).decode() if args.json else status.render(st)) + "\n")
    return 0
