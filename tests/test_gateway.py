"""The gateway on a real nats-server, with aiohttp servers as the replicas it proxies to and the KV
records a scaler and a restorer would write: routing, proxy headers, balancing, streaming, holding
through a scale-up, 503s, and retries when a replica leaves mid-request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from gateway_harness import Handler, answering, deploy, eventually, gateway, record, replica
from nats.aio.msg import Msg
from spanfix import memory_spans
from yarl import URL

from snapscale.shared import bus
from snapscale.shared.bus import Bucket, Bus, ReplicaEvent, ReplicaState, TrafficEvent, decode_message
from snapscale.shared.core import telemetry
from snapscale.shared.core.settings import Settings

S = ReplicaState


async def echo(r: web.Request) -> web.StreamResponse:
    body = await r.read()
    return web.json_response(
        {"method": r.method, "path": r.raw_path, "headers": list(r.headers.items()), "body": body.decode()},
        headers={"Connection": "keep-alive, X-Secret", "X-Secret": "hop", "Set-Cookie": "a=1"},
    )


async def test_unknown_deployment_and_none_named_get_a_404_with_a_reason(
    the_bus: Bus, settings: Settings
) -> None:
    await deploy(the_bus, "llm")
    async with gateway(settings) as g, aiohttp.ClientSession() as http:
        async with http.get(f"{g.url}/nope/v1/chat") as r:
            assert r.status == 404
            assert await r.text() == "deployment 'nope' is not deployed\n"
        async with http.get(f"{g.url}/") as r:
            assert r.status == 404
            assert (await r.text()).startswith("no deployment named in the path")
        async with http.get(f"{g.url}/bad.name/x") as r:
            assert r.status == 404
            assert "is not a deployment name" in await r.text()
        # a removed deployment is unknown again
        await the_bus.kv[Bucket.DEPLOYMENTS].delete("llm")
        await eventually(lambda: not g.gw.pools["llm"].deployed)
        async with http.get(f"{g.url}/llm/") as r:
            assert r.status == 404
        counted = g.metric("snapscale.gateway.requests")
        assert sum(v for a, v in counted if a["http.response.status_code"] == 404) == 4


async def test_path_and_host_routing_with_the_proxy_headers(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, "llm")
    async with replica(echo) as ep, gateway(settings, domain="models.test") as g:
        await record(the_bus, "llm", "r1", S.READY, ep)
        await eventually(lambda: "r1" in g.gw.pools["llm"].replicas)
        async with aiohttp.ClientSession() as http:
            hdrs = {
                "X-Forwarded-For": "10.0.0.9",
                "X-Forwarded-Host": "spoofed",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "Keep-Alive": "timeout=5",
                "X-Keep": "yes",
            }
            raw = URL(f"{g.url}/llm/v1/chat?x=1&y=%2F", encoded=True)  # passed on as the client wrote it
            async with http.post(raw, data=b"hi", headers=hdrs) as r:
                assert r.status == 200
                got = await r.json()
                # hop-by-hop headers of the replica's answer do not reach the client; the rest does
                assert "X-Secret" not in r.headers and r.headers["Set-Cookie"] == "a=1"
                assert r.headers["Via"] == "1.1 snapscale-gateway"
            up = {k.lower(): v for k, v in got["headers"]}
            assert got["method"] == "POST" and got["path"] == "/v1/chat?x=1&y=%2F" and got["body"] == "hi"
            assert up["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
            assert up["x-forwarded-proto"] == "http"
            assert up["x-forwarded-host"] == g.url.removeprefix("http://")  # what it saw, never the client's
            assert up["x-forwarded-prefix"] == "/llm"
            assert up["via"] == "1.1 snapscale-gateway"
            assert up["x-keep"] == "yes"
            assert "x-drop-me" not in up and "keep-alive" not in up
            assert "user-agent" in up  # the client's own, not one the gateway made up
            # by the Host header: the path goes upstream as it is
            async with http.get(f"{g.url}/v1/models", headers={"Host": "llm.models.test:8080"}) as r:
                got = await r.json()
            up = {k.lower(): v for k, v in got["headers"]}
            assert got["path"] == "/v1/models" and "x-forwarded-prefix" not in up
            assert up["host"] == "llm.models.test:8080"
            # a host outside the domain falls back to the path
            async with http.get(f"{g.url}/llm", headers={"Host": "elsewhere.test"}) as r:
                assert (await r.json())["path"] == "/"


async def test_least_outstanding_requests_and_the_per_replica_limit(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, "llm", concurrency_limit=1)
    release = asyncio.Event()
    served: list[str] = []

    def slow(name: str) -> Handler:
        async def h(r: web.Request) -> web.StreamResponse:
            served.append(name)
            if r.path == "/slow":
                await release.wait()
            return web.Response(text=name)

        return h

    async with replica(slow("a")) as a, replica(slow("b")) as b, gateway(settings) as g:
        await record(the_bus, "llm", "ra", S.READY, a)
        await record(the_bus, "llm", "rb", S.READY, b)
        pool = g.gw.pools["llm"]
        await eventually(lambda: len(pool.replicas) == 2)
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> str:
                async with http.get(f"{g.url}/llm{path}") as r:
                    return await r.text()

            first = asyncio.create_task(get("/slow"))
            await eventually(lambda: len(served) == 1)
            # the busy replica has one outstanding request: the next ones go to the idle one
            assert await get("/fast") != served[0]
            assert await get("/fast") != served[0]
            # both replicas busy at their limit of 1: a third request is held until a slot frees
            second = asyncio.create_task(get("/slow"))
            await eventually(lambda: len(served) == 4)
            third = asyncio.create_task(get("/fast"))
            await eventually(lambda: len(pool.waiters) == 1, what="held at the limit")
            assert len(served) == 4
            release.set()
            assert {await first, await second} == {"a", "b"}
            assert await third in ("a", "b")
            assert [o.outstanding for o in pool.replicas.values()] == [0, 0]


async def test_streaming_answers_pass_through_as_they_come(the_bus: Bus, settings: Settings) -> None:
    """The replica sends its second half only after the client got the first: a gateway that
    buffered the answer would never get it, and the test would time out."""
    await deploy(the_bus, "llm")
    got_first = asyncio.Event()

    async def stream(r: web.Request) -> web.StreamResponse:
        sse = r.path == "/events"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"} if sse else None)
        await resp.prepare(r)  # no length: chunked
        await resp.write(b"data: one\n\n" if sse else b"first|")
        await asyncio.wait_for(got_first.wait(), 10)
        await resp.write(b"data: two\n\n" if sse else b"second")
        await resp.write_eof()
        return resp

    async with replica(stream) as ep, gateway(settings) as g:
        await record(the_bus, "llm", "r1", S.READY, ep)
        await eventually(lambda: "r1" in g.gw.pools["llm"].replicas)
        async with aiohttp.ClientSession() as http:
            cases = (("/gen", b"first|", b"second"), ("/events", b"data: one\n\n", b"data: two\n\n"))
            for path, first, second in cases:
                got_first.clear()
                async with http.get(f"{g.url}/llm{path}") as r:
                    assert r.headers.get("Transfer-Encoding") == "chunked"
                    if path == "/events":
                        assert r.headers["Content-Type"] == "text/event-stream"
                    chunk = await asyncio.wait_for(r.content.readexactly(len(first)), 5)
                    assert chunk == first
                    got_first.set()
                    assert await asyncio.wait_for(r.content.read(), 5) == second


async def test_held_requests_go_out_the_moment_a_replica_is_ready(the_bus: Bus, settings: Settings) -> None:
    """At zero: the first request is reported at once (activation), requests wait while the
    replica restores, and all are answered as soon as its ready record lands in KV."""
    await deploy(the_bus, "llm")
    spans = memory_spans()
    events: list[tuple[float, TrafficEvent, dict[str, str]]] = []

    async def tap(m: Msg) -> None:
        events.append((time.monotonic(), decode_message(m.data, TrafficEvent), dict(m.headers or {})))

    sub = await the_bus.nc.subscribe(the_bus.subjects.traffic("llm"), cb=tap)
    async with replica(answering("hello")) as ep, gateway(settings, report_s=1.0) as g:
        pool = g.gw.pools["llm"]
        async with aiohttp.ClientSession() as http:

            async def get() -> tuple[int, str, float]:
                async with http.get(f"{g.url}/llm/generate") as r:
                    return r.status, await r.text(), time.monotonic()

            t0 = time.monotonic()
            held = [asyncio.create_task(get()) for _ in range(3)]
            await eventually(lambda: bool(events), 5, "an activation event")
            t_act, ev, headers = events[0]
            assert t_act - t0 < 0.5, "reported at once, not at the next 1 s report"
            assert ev.source == "gw-test" and ev.concurrency >= 1 and ev.arrivals >= 1
            # published inside the request's span: the scale-up it starts continues the request's trace
            activating = headers["traceparent"].split("-")[2]
            # the restorer's events carry the scale-up's trace (as KV records cannot)
            with telemetry.tracer("restorer").start_as_current_span("restore") as restore:
                await record(the_bus, "llm", "r1", S.RESTORING)
                ev_r = ReplicaEvent("llm", "r1", "host-a", S.RESTORING, time.time())
                await bus.publish(the_bus, the_bus.subjects.evt_replica("llm"), ev_r)
            await eventually(lambda: "r1" in pool.trace)
            await eventually(lambda: len(pool.waiters) == 3)
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in held)
            await eventually(lambda: any(e.concurrency == 3 for _, e, _ in events), 3, "3 held, reported")
            # every report while they wait carries the waking request's trace: the scaler may act
            # on any of them (one that knew the deployment only after the first)
            waking = headers["traceparent"].split("-")[1]
            assert len(events) >= 2
            assert {h.get("traceparent", "-").split("-")[1] for _, _, h in events} == {waking}
            t_ready = time.monotonic()
            await record(the_bus, "llm", "r1", S.READY, ep)
            answers = await asyncio.gather(*held)
        assert [(s, t) for s, t, _ in answers] == [(200, "hello")] * 3
        latest = max(t for _, _, t in answers) - t_ready
        assert latest < 0.5, f"held requests answered {latest:.3f}s after the ready record"
        await eventually(lambda: events[-1][1].concurrency == 0, 5, "a last report at zero")
        held_points = g.metric("snapscale.gateway.held_s")
        assert held_points and held_points[0][1] == 3
    await sub.unsubscribe()
    mine = [s for s in spans.get_finished_spans() if s.name == "gateway.request"]
    mine = [s for s in mine if s.attributes and s.attributes.get("snapscale.deployment") == "llm"][-3:]
    assert len(mine) == 3
    for s in mine:
        a = s.attributes or {}
        assert a["snapscale.replica"] == "r1" and a["http.response.status_code"] == 200
        assert float(a["snapscale.gateway.held_s"]) > 0.3  # type: ignore[arg-type]
        assert float(a["snapscale.gateway.upstream_s"]) < float(a["snapscale.gateway.held_s"])  # type: ignore[arg-type]
        assert [ln.context.trace_id for ln in s.links] == [restore.get_span_context().trace_id]
    assert activating in {f"{s.context.span_id:016x}" for s in mine if s.context}


async def test_a_full_queue_and_a_timeout_get_503_with_retry_after_and_why(
    the_bus: Bus, settings: Settings
) -> None:
    await deploy(the_bus, "llm", queue_size=2, queue_timeout_s=0.5)
    async with gateway(settings) as g, aiohttp.ClientSession() as http:
        await record(the_bus, "llm", "r1", S.STARTING)
        await eventually(lambda: "r1" in g.gw.pools["llm"].coming)

        async def get() -> tuple[int, str, str | None, float]:
            t0 = time.monotonic()
            async with http.get(f"{g.url}/llm/x") as r:
                return r.status, await r.text(), r.headers.get("Retry-After"), time.monotonic() - t0

        held = [asyncio.create_task(get()) for _ in range(2)]
        await eventually(lambda: len(g.gw.pools["llm"].waiters) == 2)
        status, why, after, _ = await get()
        assert (status, after) == (503, "2")
        assert why == "deployment llm: cold booting; 2 requests held already\n"
        for status, why, after, took in await asyncio.gather(*held):
            assert (status, after) == (503, "2")
            assert why == "deployment llm: cold booting; no replica within 0.5s\n"
            assert 0.5 <= took < 3.0
        # a failed replica is the reason once nothing else is on its way
        await record(the_bus, "llm", "r1", S.FAILED, reason="criu restore failed: boom")
        await eventually(lambda: not g.gw.pools["llm"].coming)
        status, why, after, _ = await get()
        assert (status, after) == (503, "5")
        assert why == "deployment llm: failed: criu restore failed: boom; no replica within 0.5s\n"
        refused = {str(a["snapscale.gateway.refused"]): v for a, v in g.metric("snapscale.gateway.refused")}
        assert refused == {"queue-full": 1, "timeout": 3}


async def test_a_replica_lost_mid_request_has_its_idempotent_requests_retried_once(
    the_bus: Bus, settings: Settings
) -> None:
    await deploy(the_bus, "llm")
    arrived: list[str] = []
    hang = asyncio.Event()

    async def stuck(r: web.Request) -> web.StreamResponse:
        arrived.append(f"{r.method} {r.path}")
        await hang.wait()  # never answers while the test runs
        return web.Response(text="late")

    async with replica(stuck) as a, replica(answering("from b")) as b, gateway(settings) as g:
        pool = g.gw.pools["llm"]
        await record(the_bus, "llm", "ra", S.READY, a)
        await eventually(lambda: "ra" in pool.replicas)
        async with aiohttp.ClientSession() as http:

            async def call(method: str) -> tuple[int, str]:
                body = b"{}" if method != "GET" else None
                async with http.request(method, f"{g.url}/llm/x", data=body) as r:
                    return r.status, await r.text()

            get, put, post = (asyncio.create_task(call(m)) for m in ("GET", "PUT", "POST"))
            await eventually(lambda: len(arrived) == 3)
            await record(the_bus, "llm", "rb", S.READY, b)
            await eventually(lambda: "rb" in pool.replicas)
            # ra is released with three requests in flight: GET and PUT go to rb, POST stays
            await record(the_bus, "llm", "ra", S.RELEASING)
            assert await asyncio.wait_for(get, 5) == (200, "from b")
            assert await asyncio.wait_for(put, 5) == (200, "from b")
            await asyncio.sleep(0.2)
            assert not post.done(), "a POST is not repeated: it waits for its own replica's answer"
            hang.set()
            assert await asyncio.wait_for(post, 5) == (200, "late")
        assert g.gw.counters["retried"] == 2
        assert arrived.count("GET /x") == 1 and arrived.count("PUT /x") == 1  # once each on ra

    # a replica that refuses connections (its process died, its record still says ready): any
    # request, POST too, goes to another once (nothing was sent); a second failure is a 502
    async with replica(answering("from b")) as b, gateway(settings, eject_s=0.5) as g:
        pool = g.gw.pools["llm"]
        dead = f"127.0.0.1:{_closed_port()}"
        await record(the_bus, "llm", "ra", S.READY, dead)
        await record(the_bus, "llm", "rb", S.READY, b)
        await eventually(lambda: {"ra", "rb"} <= set(pool.replicas))
        async with aiohttp.ClientSession() as http:
            for _ in range(4):  # ties go in turn: one of these tries the dead one first
                async with http.post(f"{g.url}/llm/x", data=b"{}") as r:
                    assert (r.status, await r.text()) == (200, "from b")
            # the dead one was tried once and set aside: the others went straight to rb
            assert g.gw.counters["ejected"] == 1
            await record(the_bus, "llm", "rb", S.READY, f"127.0.0.1:{_closed_port()}")
            await eventually(lambda: pool.replicas["rb"].endpoint != b)
            async with http.get(f"{g.url}/llm/x") as r:
                assert r.status == 502
                assert "failed" in await r.text()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_bad_spec_keeps_the_limits_it_had(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, "llm", queue_size=7)
    async with gateway(settings) as g:
        assert g.gw.pools["llm"].limits.queue_size == 7
        await deploy(the_bus, "llm", queue_size=-1)
        await eventually(lambda: g.gw.counters["specs.refused"] == 1)
        assert g.gw.pools["llm"].limits.queue_size == 7
        raw = orjson.loads((await the_bus.kv[Bucket.DEPLOYMENTS].get("llm")).value or b"{}")
        assert raw["scaling"]["queue_size"] == -1


async def test_held_requests_are_answered_when_the_gateway_stops(the_bus: Bus, settings: Settings) -> None:
    await deploy(the_bus, "llm")
    async with aiohttp.ClientSession() as http:
        async with gateway(settings) as g:

            async def get() -> tuple[int, str | None]:
                async with http.get(f"{g.url}/llm/x") as r:
                    return r.status, r.headers.get("Retry-After")

            held = asyncio.create_task(get())
            await eventually(lambda: len(g.gw.pools["llm"].waiters) == 1)
            t0 = time.monotonic()
        assert await asyncio.wait_for(held, 5) == (503, "1")
        assert time.monotonic() - t0 < 5, "held requests do not wait out the drain"


async def test_bodies_are_framed_both_ways_and_connections_kept(the_bus: Bus, settings: Settings) -> None:
    """The gateway's own client to replicas: request bodies streamed or whole, answers framed by
    length, chunks or the close, HEAD and 204 without a body; one connection reused throughout."""
    await deploy(the_bus, "llm")
    peers: set[object] = set()

    async def h(r: web.Request) -> web.StreamResponse:
        peers.add(r.transport.get_extra_info("peername") if r.transport else None)
        if r.path == "/head-or-204":
            return web.Response(status=204 if r.method == "GET" else 200, headers={"X-Len": "7"})
        body = await r.read()
        return web.Response(
            body=body.upper(), headers={"X-Chunked": str(r.headers.get("Transfer-Encoding") == "chunked")}
        )

    async def stream_body() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part
            await asyncio.sleep(0.01)

    async with replica(h) as ep, gateway(settings) as g, aiohttp.ClientSession() as http:
        await record(the_bus, "llm", "r1", S.READY, ep)
        await eventually(lambda: "r1" in g.gw.pools["llm"].replicas)
        for _ in range(3):
            async with http.post(f"{g.url}/llm/up", data=b"whole") as r:
                assert (await r.read(), r.headers["X-Chunked"]) == (b"WHOLE", "False")
        big = bytes(range(256)) * 8192  # 2 MiB: beyond what is kept for a retry, so it streams
        async with http.put(f"{g.url}/llm/up", data=big) as r:
            assert await r.read() == big.upper()
        async with http.post(f"{g.url}/llm/up", data=stream_body()) as r:  # chunked from the client
            assert (await r.read(), r.headers["X-Chunked"]) == (b"ONE,TWO,THREE", "True")
        async with http.get(f"{g.url}/llm/head-or-204") as r:
            assert (r.status, await r.read()) == (204, b"")
        async with http.head(f"{g.url}/llm/head-or-204") as r:
            assert (r.status, r.headers["X-Len"]) == (200, "7")
        async with http.get(f"{g.url}/llm/up") as r:
            assert r.status == 200
        assert len(peers) == 1, f"one keep-alive connection to the replica, not {len(peers)}"


async def test_answers_read_to_the_close_and_answers_cut_short(the_bus: Bus, settings: Settings) -> None:
    """A replica that frames its answer by closing (HTTP/1.0 style) is passed on whole; one that
    breaks off mid-answer leaves the client with a cut answer, never a short whole one."""
    await deploy(the_bus, "llm")

    async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b" /cut " in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        else:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, gateway(settings) as g, aiohttp.ClientSession() as http:
        await record(the_bus, "llm", "r1", S.READY, f"127.0.0.1:{port}")
        await eventually(lambda: "r1" in g.gw.pools["llm"].replicas)
        async with http.get(f"{g.url}/llm/eof") as r:
            assert (r.status, await r.read()) == (200, b"to the end")
        async with http.get(f"{g.url}/llm/cut") as r:
            assert r.status == 200
            try:
                got = await r.read()
            except aiohttp.ClientPayloadError:
                got = None
            assert got is None, f"a cut answer read as a whole one: {got!r}"


async def test_a_client_that_leaves_takes_its_held_request_and_its_work_with_it(
    the_bus: Bus, settings: Settings
) -> None:
    await deploy(the_bus, "llm")
    seen_close = asyncio.Event()

    async def slow(r: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(r)
        try:
            for _ in range(100):
                await resp.write(b"token ")
                await asyncio.sleep(0.05)
        except ConnectionResetError:
            seen_close.set()  # the gateway closed its side: the replica can stop generating
        return resp

    async with gateway(settings) as g:
        pool = g.gw.pools["llm"]
        async with aiohttp.ClientSession() as http:
            held = asyncio.create_task(http.get(f"{g.url}/llm/x"))
            await eventually(lambda: len(pool.waiters) == 1)
            held.cancel()  # the client gives up while its request is held
        await eventually(lambda: not pool.waiters and pool.active == 0, 5, "the held request gone")
        async with replica(slow) as ep:
            await record(the_bus, "llm", "r1", S.READY, ep)
            await eventually(lambda: "r1" in pool.replicas)
            async with aiohttp.ClientSession() as http, http.get(f"{g.url}/llm/gen") as r:
                assert await r.content.readexactly(6) == b"token "
            # the client closed mid-answer: the gateway closes the replica's connection too
            await asyncio.wait_for(seen_close.wait(), 5)
            await eventually(lambda: pool.active == 0 and pool.replicas["r1"].outstanding == 0, 5)


async def test_expect_100_continue_is_answered_by_the_gateway(the_bus: Bus, settings: Settings) -> None:
    """curl sends `Expect: 100-continue` before a body over 1 KiB and waits a second for a go-ahead:
    the gateway gives it at once (the header does not go upstream)."""
    await deploy(the_bus, "llm")
    async with replica(echo) as ep, gateway(settings) as g:
        await record(the_bus, "llm", "r1", S.READY, ep)
        await eventually(lambda: "r1" in g.gw.pools["llm"].replicas)
        host, port = g.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = b"x" * 2000
        writer.write(
            b"POST /llm/up HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = orjson.loads(rest)
        assert got["body"] == body.decode()
        assert "expect" not in {k.lower() for k, _v in got["headers"]}
        # an expectation it does not know: 417
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /llm/up HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nExpect: magic\r\n\r\nhi")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 417")
        writer.close()


async def test_a_failure_the_scaler_declares_is_the_reason_held_requests_get(
    the_bus: Bus, settings: Settings
) -> None:
    """The scaler fails a replica that was not ready in time with an event, then deletes its
    record: the event's reason is what the 503 says."""
    await deploy(the_bus, "llm", queue_timeout_s=0.3)
    async with gateway(settings) as g, aiohttp.ClientSession() as http:
        pool = g.gw.pools["llm"]
        await record(the_bus, "llm", "r1", S.PENDING)
        await eventually(lambda: "r1" in pool.coming)
        failed = ReplicaEvent("llm", "r1", "host-a", S.FAILED, time.time(), reason="not ready within 30s")
        await bus.publish(the_bus, the_bus.subjects.evt_replica("llm"), failed)
        await the_bus.kv[Bucket.REPLICAS].delete("llm.r1")
        await eventually(lambda: not pool.coming and pool.failure is not None)
        async with http.get(f"{g.url}/llm/x") as r:
            assert (r.status, r.headers["Retry-After"]) == (503, "5")
            assert await r.text() == "deployment llm: failed: not ready within 30s; no replica within 0.3s\n"
