"""The freezer's subcommands for the `snapscale` CLI: `freezer` (the service) and `freeze` (the
operator's verb). Thin: parse, build Settings from the environment once, run, exit code."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from typing import Any

from snapscale.shared.core import runtime
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
    p = sub.add_parser("freezer", help="run the freezer service for one host (consumes cmd.freeze.<host>)")
    p.add_argument("--host", help="host id (default: SNAPSCALE_HOST_ID or the hostname)")
    p.add_argument("--ack-wait-s", type=float, default=30.0, help="JetStream ack wait; in_progress every 1/3")
    p.add_argument("--max-deliver", type=int, default=5)
    p.add_argument("--claim-ttl-s", type=float, default=120.0, help="auto-freeze claim lifetime")
    p.add_argument("--drain-s", type=float, default=300.0, help="on SIGTERM, time the freeze in flight gets")
    p.add_argument("--chunk-bytes", type=int, default=None, help="chunk size (default: the store's)")
    p.set_defaults(func=_serve)

    f = sub.add_parser("freeze", help="freeze a replica now and print the checkpoint's sizes and timings")
    f.add_argument("deployment")
    f.add_argument("--replica", help="default: the oldest ready replica in KV 'replicas'")
    f.add_argument("--host", help="default: the replica's host from KV 'replicas'")
    f.add_argument(
        "--stop", action="store_true", help="stop the replica after the dump (default: keep serving)"
    )
    f.add_argument("--timeout-s", type=float, default=900.0)
    f.set_defaults(func=_freeze)


def _serve(args: argparse.Namespace) -> int:
    from snapscale.freezer.config import FreezerConfig
    from snapscale.freezer.service import serve

    overrides: dict[str, object] = {"host_id": args.host} if args.host else {}
    settings = Settings.from_env(None, **overrides)
    if settings.service_name == "snapscale":  # OTEL_SERVICE_NAME, when set, wins
        settings = replace(settings, service_name="snapscale-freezer")
    runtime.setup_logging(settings.log_level)
    opts = FreezerConfig(
        ack_wait_s=args.ack_wait_s,
        max_deliver=args.max_deliver,
        claim_ttl_s=args.claim_ttl_s,
        drain_s=args.drain_s,
        chunk_bytes=args.chunk_bytes,
    )
    return runtime.serve(
        settings.service_name,
        settings.otlp_endpoint,
        lambda stop: serve(settings, opts, stop=stop),
        metrics_address=settings.metrics_address,
    )


def _freeze(args: argparse.Namespace) -> int:
    from snapscale.freezer.operator import format_event, freeze

    settings = Settings.from_env()
    runtime.setup_logging("WARNING")
    try:
        ev = asyncio.run(
            freeze(
                settings,
                args.deployment,
                replica=args.replica,
                host=args.host,
                keep_running=not args.stop,
                timeout_s=args.timeout_s,
            )
        )
    except TimeoutError as e:
        print(f"snapscale freeze: {e}", file=sys.stderr)
        return 1
    print(format_event(ev))
    return 0 if ev.ok else 1
