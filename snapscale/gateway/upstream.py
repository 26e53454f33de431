"""The gateway's client to its replicas: keep-alive HTTP/1.1 connections, one request at a time each.

aiohttp's ClientSession spent about 160 us of CPU a request on the dev VM on timers, traces, cookie
and header machinery the gateway has no use for: as much as all the rest of the gateway. This client
writes the request head itself and reads the answer with aiohttp's own response parser (C) and
StreamReader, so the body's framing (Content-Length, chunked, read to close, HEAD, 204/304) is
parsed exactly as aiohttp parses it, and the body streams with the same flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from aiohttp import ClientPayloadError, StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from multidict import CIMultiDict, CIMultiDictProxy

IDLE_S = 30.0  # an idle connection older than this is closed rather than reused
MAX_IDLE = 256  # idle connections kept per replica
_FRAMING = ("content-length", "transfer-encoding")


class UpstreamError(Exception):
    """A try that got no answer. `unsent`: the request never reached the replica (no connection)."""

    def __init__(self, reason: str, *, unsent: bool) -> None:
        super().__init__(reason)
        self.unsent = unsent


class _Conn(BaseProtocol):
    """One connection to a replica; `start` arms it for the next answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: str) -> None:
        super().__init__(loop)
        self.endpoint = endpoint
        self.answer: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self.payload: StreamReader | None = None
        self.idle_since = 0.0
        self.closed = False

    def start(self, head: bool) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        self._parser = HttpResponseParser(
            self,
            self._loop,
            2**16,
            payload_exception=ClientPayloadError,
            response_with_body=not head,
            read_until_eof=True,
            auto_decompress=False,  # bodies pass through as the replica encoded them
        )
        self.payload = None
        self.answer = self._loop.create_future()
        return self.answer

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # talking out of turn, between requests: not a connection to trust
            if self.transport is not None:
                self.transport.close()
            return
        try:
            messages, _upgraded, _tail = parser.feed_data(data)
        except Exception as e:
            if self.transport is not None:
                self.transport.close()
            self._fail(UpstreamError(f"bad answer: {e}", unsent=False))
            return
        for msg, payload in messages:
            if msg.code < 200:  # 1xx: an interim answer, the real one follows
                continue
            if self.answer is not None and not self.answer.done():
                self.payload = payload
                self.answer.set_result((msg, payload))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        super().connection_lost(exc)
        if self._parser is not None:
            with contextlib.suppress(Exception):
                self._parser.feed_eof()  # a body read to the close ends here
            self._parser = None
        self._fail(UpstreamError(f"closed the connection{f' ({exc})' if exc else ''}", unsent=False))

    def _fail(self, e: UpstreamError) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(e)
        elif self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(ClientPayloadError(f"answer cut off: {e}"))

    def reusable(self) -> bool:
        return not self.closed and self.payload is not None and self.payload.is_eof()


@dataclass(slots=True)
class Answer:
    """A replica's answer head; `payload` streams its body."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    payload: StreamReader
    keep_alive: bool
    conn: _Conn


class Client:
    """Connections to every replica, kept alive between requests (most recently used first)."""

    def __init__(self, connect_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[str, list[_Conn]] = {}

    async def _connection(self, endpoint: str) -> _Conn:
        now = time.monotonic()
        idle = self._idle.get(endpoint)
        while idle:
            c = idle.pop()
            if not c.closed and now - c.idle_since < IDLE_S:
                return c
            if c.transport is not None:
                c.transport.close()
        host, _, port = endpoint.rpartition(":")
        loop = asyncio.get_running_loop()
        host = host.strip("[]")  # [v6]:port
        if not port.isdigit():
            raise UpstreamError(f"endpoint {endpoint!r} is not host:port", unsent=True)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _t, c = await loop.create_connection(lambda: _Conn(loop, endpoint), host, int(port))
        except (OSError, TimeoutError) as e:
            why = str(e) or type(e).__name__
            raise UpstreamError(f"cannot connect to {endpoint}: {why}", unsent=True) from None
        return c

    async def send(
        self,
        endpoint: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | StreamReader | None,
    ) -> Answer:
        """Send a request and wait for the answer's head. `UpstreamError` when none comes."""
        c = await self._connection(endpoint)
        answer = c.start(method == "HEAD")
        head = [f"{method} {target} HTTP/1.1\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in _FRAMING]
        stream = isinstance(body, StreamReader)
        if isinstance(body, bytes):
            head.append(f"Content-Length: {len(body)}\r\n")
        elif stream:
            n = headers.get("Content-Length")
            head.append(f"Content-Length: {n}\r\n" if n is not None else "Transfer-Encoding: chunked\r\n")
        head.append("\r\n")
        try:
            assert c.transport is not None
            c.transport.write("".join(head).encode("latin-1") + (body if isinstance(body, bytes) else b""))
            if isinstance(body, StreamReader):
                await self._send_body(c, body, chunked="Content-Length" not in headers)
            msg, payload = await answer
        except BaseException:
            self.discard(c)
            raise
        keep = not msg.should_close
        if method == "HEAD" and msg.version >= (1, 1):
            # the parser reads "no length" as "to the close", but an answer to HEAD has no body
            keep = "close" not in msg.headers.get("Connection", "").lower()
        return Answer(msg.code, msg.reason, msg.headers, payload, keep, c)

    async def _send_body(self, c: _Conn, body: StreamReader, *, chunked: bool) -> None:
        async for chunk in body.iter_any():
            if c.transport is None:
                return  # the replica went away: its answer (or the lack of one) says so
            c.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await c._drain_helper()
        if chunked and c.transport is not None:
            c.transport.write(b"0\r\n\r\n")

    def release(self, a: Answer) -> None:
        """The answer was read to its end: keep the connection for the next request."""
        c = a.conn
        c._parser = None
        if not (a.keep_alive and c.reusable()):
            self.discard(c)
            return
        idle = self._idle.setdefault(c.endpoint, [])
        if len(idle) >= MAX_IDLE:
            self.discard(c)
            return
        c.idle_since = time.monotonic()
        idle.append(c)

    def discard(self, c: _Conn) -> None:
        c._parser = None
        c.closed = True
        if c.transport is not None:
            c.transport.close()

    def forget(self, endpoint: str) -> None:
        """The replica left: close its idle connections."""
        for c in self._idle.pop(endpoint, []):
            self.discard(c)

    def close(self) -> None:
        for endpoint in list(self._idle):
            self.forget(endpoint)
