"""The gateway's subcommand for the `snapscale` CLI. Thin: parse, build Settings once, run."""

from __future__ import annotations

import argparse

from snapscale.shared.core import runtime
from snapscale.shared.core.cliargs import subcommand
from snapscale.shared.core.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's subcommand to the `snapscale` parser."""
    p = subcommand(
        sub, "gateway", "run a gateway: route, balance and hold requests, report traffic",
        "bus", "gateway", "telemetry",
    )  # fmt: skip
    p.add_argument("--listen", help="host:port to serve on (default: SNAPSCALE_GATEWAY_LISTEN, 0.0.0.0:8080)")
    p.add_argument("--domain", help="also route Host <deployment>.<domain> (SNAPSCALE_GATEWAY_DOMAIN)")
    p.add_argument("--id", dest="gateway_id", help="its id in traffic events (SNAPSCALE_GATEWAY_ID)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from snapscale.gateway.config import GatewayConfig
    from snapscale.gateway.service import Gateway

    settings = Settings.from_env(None, service_name="snapscale-gateway")
    runtime.setup_logging(settings.log_level)
    cfg = GatewayConfig.from_env(
        settings.host_id, listen=args.listen, domain=args.domain, gateway_id=args.gateway_id
    )
    return runtime.serve(
        settings.service_name,
        settings.otlp_endpoint,
        Gateway(settings, cfg).run,
        metrics_address=settings.metrics_address,
    )
