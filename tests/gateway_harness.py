"""What the gateway tests share: a gateway running in this process on a real nats-server, aiohttp
servers standing in for replicas, and the KV records a scaler and a restorer would write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from aiohttp import web
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from snapscale.gateway.config import GatewayConfig
from snapscale.gateway.service import Gateway
from snapscale.shared.bus import Bucket, Bus, DeploymentSpec, ReplicaEvent, ReplicaState, encode_message
from snapscale.shared.core.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Running:
    """A gateway started by `gateway()`: its url, its pools, its metrics."""

    def __init__(self, gw: Gateway, reader: InMemoryMetricReader) -> None:
        self.gw = gw
        self.reader = reader
        assert gw.address is not None
        self.url = f"http://127.0.0.1:{gw.address[1]}"

    def metric(self, name: str) -> list[tuple[dict[str, object], float]]:
        """(attributes, value) of every point of a counter, or (attributes, count) of a histogram."""
        out: list[tuple[dict[str, object], float]] = []
        data = self.reader.get_metrics_data()
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        for p in m.data.data_points:
                            value = p.count if isinstance(p, HistogramDataPoint) else getattr(p, "value", 0)
                            out.append((dict(p.attributes or {}), float(value)))
        return out


@contextlib.asynccontextmanager
async def gateway(settings: Settings, **cfg: object) -> AsyncIterator[Running]:
    """A gateway on a free loopback port until the block ends (then stopped as SIGTERM would)."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("gateway-test")
    kw: dict[str, object] = {"gateway_id": "gw-test", "listen_host": "127.0.0.1", "listen_port": 0}
    kw.update({"report_s": 0.2, **cfg})
    gw = Gateway(settings, GatewayConfig(**kw), meter=meter)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
    assert gw.ready.is_set(), "the gateway did not come up within 15 s"
    try:
        yield Running(gw, reader)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


@contextlib.asynccontextmanager
async def replica(handler: Handler) -> AsyncIterator[str]:
    """An aiohttp server answering every path with `handler`; yields its endpoint (host:port)."""
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


def answering(text: str) -> Handler:
    async def h(_r: web.Request) -> web.StreamResponse:
        return web.Response(text=text)

    return h


SPEC = DeploymentSpec(name="llm", command=["serve"])


async def deploy(b: Bus, name: str = "llm", **scaling: object) -> DeploymentSpec:
    spec = replace(SPEC, name=name, scaling=replace(SPEC.scaling, **scaling))  # type: ignore[arg-type]
    await b.kv[Bucket.DEPLOYMENTS].put(name, spec.to_json())
    return spec


async def record(
    b: Bus, dep: str, replica_id: str, state: ReplicaState, endpoint: str = "", reason: str = ""
) -> ReplicaEvent:
    """A replica's KV record, as the restorer (or the scaler, for pending) writes it."""
    ev = ReplicaEvent(dep, replica_id, "host-a", state, time.time(), reason=reason, endpoint=endpoint)
    await b.kv[Bucket.REPLICAS].put(f"{dep}.{replica_id}", encode_message(ev))
    return ev


async def eventually(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.01)
