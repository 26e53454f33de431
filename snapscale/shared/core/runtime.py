"""Process plumbing for the services: logging, uvloop, loud background tasks, graceful stop.

A forever-loop that crashes is logged, never silent; SIGTERM sets a stop event.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from snapscale.shared.core import telemetry

T = TypeVar("T")
log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a service's main coroutine on uvloop."""
    return uvloop.run(main())


def serve(
    service_name: str,
    otlp_endpoint: str | None,
    body: Callable[[asyncio.Event], Awaitable[None]],
    *,
    metrics_address: tuple[str, int] | None = None,
) -> int:
    """Run a service's `body(stop)` on uvloop until SIGTERM or SIGINT sets `stop`, with telemetry set
    up inside the loop and flushed at exit (the one way the services start). `metrics_address`
    (SNAPSCALE_METRICS_HOST/PORT) opens the Prometheus `/metrics` endpoint."""

    async def main() -> None:
        telemetry.setup(service_name, otlp_endpoint, metrics_address=metrics_address)
        stop = asyncio.Event()
        install_stop_signals(stop)
        try:
            await body(stop)
        finally:
            telemetry.shutdown()

    run(main)
    return 0


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def guard(
    coro: Awaitable[None], name: str, *, on_crash: Callable[[], None] | None = None
) -> asyncio.Task[None]:
    """Start a background task whose crash is logged (and may stop the service via `on_crash`)."""

    async def wrapper() -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s crashed", name)
            if on_crash is not None:
                on_crash()

    return asyncio.create_task(wrapper(), name=name)
