"""The request path: route a request, take a replica or hold the request until one is ready, forward
it and stream the answer back as it arrives; an idempotent request whose replica fails or leaves
before answering is retried once on another replica.

One span per request (held time, upstream time, replica), linked to the scale-up's trace when the
request waited for one (the request that found no replica publishes the activation inside its own
span, so the scale-up it starts is in its trace); metrics for requests, held time and 503s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind

from snapscale.gateway.config import GatewayConfig
from snapscale.gateway.pool import Attempt, DeploymentGone, Pool, Stopping, Upstream
from snapscale.gateway.routing import NoRoute, Route, downstream_headers, route, upstream_headers
from snapscale.gateway.upstream import Client, UpstreamError
from snapscale.shared.core import telemetry

log = logging.getLogger(__name__)
tracer = telemetry.tracer("snapscale.gateway")


class Metrics:
    """The gateway's instruments, on the process's meter unless a test hands in its own."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        m = meter or telemetry.meter("snapscale.gateway")
        self.requests = m.create_counter(
            "snapscale.gateway.requests", unit="{request}", description="requests answered, by status"
        )
        self.held = m.create_histogram(
            "snapscale.gateway.held_s", unit="s", description="time a request waited for a ready replica"
        )
        self.refused = m.create_counter(
            "snapscale.gateway.refused", unit="{request}", description="503s: queue full or held too long"
        )


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
STOPPING = "this gateway is stopping; another one, or this one restarted, will take the request"
REPLAY_MAX_BYTES = 1 << 20  # an idempotent request's body up to this is kept, so a retry can send it


@dataclass(slots=True)
class Outcome:
    """What one request went through, for its span and the metrics."""

    status: int = 0
    held_s: float = 0.0
    upstream_s: float = 0.0  # request sent -> response head from the replica (the last try)
    replica: str = ""
    tries: int = 0
    refused: str = ""  # why it got a 503: "queue-full", "timeout" or "stopping"
    broken: str = ""  # "replica" | "client": who broke off the answer once it had begun


class _Failed(Exception):
    """A try that ended before the replica answered. `unsent`: the request never reached it."""

    def __init__(self, reason: str, *, unsent: bool) -> None:
        super().__init__(reason)
        self.unsent = unsent


class _Answer(Exception):
    """The gateway's own answer (404, 503) from deep in the path."""

    def __init__(self, resp: web.Response) -> None:
        self.resp = resp


def text(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    """A one-line plain-text answer from the gateway itself."""
    return web.Response(status=status, text=reason + "\n", headers=headers)


Activate = Callable[[Pool, trace.Span], Awaitable[None]]


class Proxy:
    """The aiohttp handler: `handle(request)` for every request the gateway takes."""

    def __init__(
        self,
        cfg: GatewayConfig,
        pools: dict[str, Pool],
        client: Client,
        activate: Activate,
        instruments: Metrics,
        counters: Counter[str],
    ) -> None:
        self.cfg = cfg
        self.counters = counters
        self.m = instruments
        self.pools = pools
        self.client = client
        self.activate = activate

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            r = route(request.headers.get("Host"), request.raw_path, self.cfg.domain)
        except NoRoute as e:
            self.m.requests.add(1, {"snapscale.deployment": "", "http.response.status_code": 404})
            return text(404, e.reason)
        pool = self.pools.get(r.deployment)
        if pool is None or not pool.deployed:
            self.m.requests.add(1, {"snapscale.deployment": "", "http.response.status_code": 404})
            return text(404, f"deployment {r.deployment!r} is not deployed")
        pool.arrivals += 1
        pool.active += 1
        span = tracer.start_span(
            "gateway.request",
            # the client's trace, when it sent one: this request's span joins it
            context=propagate.extract(request.headers) if "traceparent" in request.headers else None,
            kind=SpanKind.SERVER,
        )
        o = Outcome()
        try:
            resp = await self._serve(request, r, pool, span, o)
            o.status = resp.status
            return resp
        except _Answer as a:
            o.status = a.resp.status
            return a.resp
        except asyncio.CancelledError:
            o.broken = o.broken or "client"  # it went away (or the gateway stops)
            raise
        finally:
            pool.active -= 1
            self._record(r.deployment, request.method, span, o)

    def _record(self, dep: str, method: str, span: trace.Span, o: Outcome) -> None:
        attrs = {"snapscale.deployment": dep}
        if span.is_recording():  # one call: each set_attribute takes the span's lock again
            a: dict[str, str | int | float] = {
                **attrs,
                "http.request.method": method,
                "http.response.status_code": o.status,
                "snapscale.gateway.held_s": o.held_s,
                "snapscale.gateway.upstream_s": o.upstream_s,
            }
            if o.replica:
                a["snapscale.replica"] = o.replica
            if o.tries > 1:
                a["snapscale.gateway.tries"] = o.tries
            if o.refused:
                a["snapscale.gateway.refused"] = o.refused
            if o.broken:
                a["snapscale.gateway.broken_by"] = o.broken
            span.set_attributes(a)
            if o.status >= 500 or o.status == 0 or o.broken == "replica":
                span.set_status(trace.StatusCode.ERROR)
        span.end()
        self.m.requests.add(1, {**attrs, "http.response.status_code": o.status})
        if o.refused:
            self.m.refused.add(1, {**attrs, "snapscale.gateway.refused": o.refused})
        if o.held_s > 0:
            self.m.held.record(o.held_s, attrs)

    async def _serve(
        self, request: web.BaseRequest, r: Route, pool: Pool, span: trace.Span, o: Outcome
    ) -> web.StreamResponse:
        retriable = request.method in IDEMPOTENT
        body: bytes | aiohttp.StreamReader | None = None
        expect = request.headers.get("Expect")
        if expect is not None and request.version >= (1, 1):
            # the gateway takes the body (it may have to hold the request): it says go on itself
            if expect.lower() != "100-continue":
                return text(417, f"Expect: {expect[:80]!r} is not something this gateway does")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper has not begun
        if request.body_exists:
            n = request.content_length
            if retriable and n is not None and n <= REPLAY_MAX_BYTES:
                body = await request.read()
            else:
                body = request.content
                retriable = False  # a streamed body cannot be sent twice
        headers = upstream_headers(
            request.headers,
            client_ip=request.remote or "",
            scheme=request.scheme,
            version=(request.version.major, request.version.minor),
            prefix=r.prefix,
            via=self.cfg.via,
        )
        propagate.inject(headers, context=trace.set_span_in_context(span))
        deadline: float | None = None
        avoid: str | None = None
        task = asyncio.current_task()
        while True:
            up = pool.take(avoid)
            if up is None:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + pool.limits.queue_timeout_s
                up = await self._hold(pool, avoid, deadline, span, o)
            o.tries += 1
            o.replica = up.replica
            attempt = Attempt(task, retriable)
            up.attempts.add(attempt)
            try:
                return await self._exchange(request, r, up, headers, body, attempt, o)
            except _Failed as e:
                if e.unsent and pool.eject(up.replica):
                    self.counters["ejected"] += 1  # new requests skip it for a while: none pays again
                    asyncio.get_running_loop().call_later(self.cfg.eject_s, pool.readmit, up.replica)
                    log.warning("replica %s refuses connections: aside for %gs", up.replica, self.cfg.eject_s)
                if o.tries > 1 or not (retriable or e.unsent):
                    log.warning("%s %s: replica %s: %s", request.method, request.path, up.replica, e)
                    return text(502, f"deployment {r.deployment}: replica {up.replica} failed: {e}")
                log.info("%s %s: replica %s: %s; retried", request.method, request.path, up.replica, e)
                avoid = up.replica
            finally:
                up.attempts.discard(attempt)
                pool.give_back(up)

    async def _hold(
        self, pool: Pool, avoid: str | None, deadline: float, span: trace.Span, o: Outcome
    ) -> Upstream:
        """Wait for a replica (the pool hands one over as soon as one is ready or has room)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if not pool.replicas and not pool.stopping:
            await self.activate(pool, span)  # tell the scaler now, not at the next report
        try:
            w = pool.hold(avoid)
        except Stopping:
            o.refused = "stopping"
            raise _Answer(text(503, STOPPING, {"Retry-After": "1"})) from None
        if w is None:
            o.refused = "queue-full"
            raise _Answer(self._refuse(pool, queue_full=True))
        try:
            async with asyncio.timeout_at(deadline):
                up = await w.future
        except BaseException as e:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                pool.give_back(w.future.result())  # handed a replica at the very moment it gave up
            else:
                w.future.cancel()
                pool.drop(w)
            o.held_s += loop.time() - t0
            if isinstance(e, TimeoutError):
                o.refused = "timeout"
                raise _Answer(self._refuse(pool, queue_full=False)) from None
            if isinstance(e, DeploymentGone):
                raise _Answer(text(404, f"deployment {pool.deployment!r} was removed while held")) from None
            if isinstance(e, Stopping):
                o.refused = "stopping"
                raise _Answer(text(503, STOPPING, {"Retry-After": "1"})) from None
            raise
        o.held_s += loop.time() - t0
        carrier = pool.trace.get(up.replica)
        if carrier:  # the scale-up's trace: the restore it waited for
            sc = trace.get_current_span(propagate.extract(carrier)).get_span_context()
            if sc.is_valid:
                span.add_link(sc, {"snapscale.link": "scale-up"})
        return up

    def _refuse(self, pool: Pool, *, queue_full: bool) -> web.Response:
        why = pool.refusal(time.time(), queue_full=queue_full)
        return text(503, why.reason, {"Retry-After": str(why.retry_after_s)})

    async def _exchange(
        self,
        request: web.BaseRequest,
        r: Route,
        up: Upstream,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader | None,
        attempt: Attempt,
        o: Outcome,
    ) -> web.StreamResponse:
        """One try: send, and once the head arrives, stream the answer through as it comes."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            a = await self.client.send(up.endpoint, request.method, r.path, headers, body)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.lost and task is not None and task.uncancel() == 0:
                raise _Failed("it left before answering", unsent=False) from None
            raise
        except UpstreamError as e:
            raise _Failed(str(e), unsent=e.unsent) from None
        attempt.answered = True  # from here on the client sees this try's answer, whatever happens
        o.upstream_s = loop.time() - t0
        done = False
        resp: web.StreamResponse | None = None
        try:
            version = (request.version.major, request.version.minor)
            out = downstream_headers(a.headers, version=version, via=self.cfg.via)
            if a.payload.is_eof() and request.method != "HEAD":
                # the whole answer came with its head (a short, fixed-length one): one write, not
                # three; nothing waits for it, so nothing is held back from the client either
                out.popall("Content-Length", None)
                body_now = a.payload.read_nowait(-1)
                done = True
                return web.Response(status=a.status, reason=a.reason, headers=out, body=body_now)
            resp = web.StreamResponse(status=a.status, reason=a.reason, headers=out)
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in a.payload.iter_any():
                    await resp.write(chunk)
            await resp.write_eof()
            done = True
            return resp
        except ConnectionResetError:
            o.broken = "client"  # the client left mid-answer: stop the replica's work on it too
            raise
        except aiohttp.ClientPayloadError as e:
            # the replica broke off mid-answer: the client must see a cut answer, never a short whole one
            log.warning("%s %s: replica %s broke off: %s", request.method, request.path, up.replica, e)
            o.broken = "replica"
            if resp is None:
                return text(502, f"deployment {r.deployment}: replica {up.replica} broke off its answer: {e}")
            if request.transport is not None:
                request.transport.abort()
            return resp
        finally:
            if done:
                self.client.release(a)
            else:
                self.client.discard(a.conn)
