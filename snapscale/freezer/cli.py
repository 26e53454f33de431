"""The freezer's subcommand for the `snapscale` CLI: `freezer`, the service. Thin: parse, build
Settings from the environment once, run, exit code. (`snapscale freeze`, the operator's verb, is
in snapscale/cli.)"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from snapscale.shared.core import runtime
from snapscale.shared.core.cliargs import add_alias, duration, size, subcommand
from snapscale.shared.core.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's subcommands to the `snapscale` parser."""
    p = subcommand(
        sub, "freezer", "run the freezer service for one host (consumes cmd.freeze.<host>)",
        "bus", "store", "host", "telemetry",
    )  # fmt: skip
    p.add_argument("--host", help="host id (default: SNAPSCALE_HOST_ID or the hostname)")
    p.add_argument(
        "--ack-wait", dest="ack_wait_s", type=duration, default="30s",
        help="JetStream ack wait; a freeze in flight reports progress every third of it",
    )  # fmt: skip
    p.add_argument(
        "--max-deliver", type=int, default=5, help="deliveries of one freeze command before it is dropped"
    )
    p.add_argument(
        "--claim-ttl", dest="claim_ttl_s", type=duration, default="120s",
        help="auto-freeze claim lifetime (another host may take over a claim this old)",
    )  # fmt: skip
    p.add_argument(
        "--drain", dest="drain_s", type=duration, default="300s",
        help="on SIGTERM, the time the freeze in flight gets",
    )  # fmt: skip
    p.add_argument(
        "--chunk-size", dest="chunk_bytes", type=size, default=None,
        help="chunk size, e.g. 4MiB (default: the store's)",
    )  # fmt: skip
    add_alias(p, "--ack-wait-s", "ack_wait_s", duration)
    add_alias(p, "--claim-ttl-s", "claim_ttl_s", duration)
    add_alias(p, "--drain-s", "drain_s", duration)
    add_alias(p, "--chunk-bytes", "chunk_bytes", size)
    p.set_defaults(func=_serve)


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
