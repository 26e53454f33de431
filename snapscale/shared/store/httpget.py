"""A minimal HTTP/1.1 GET that lands a response body straight in the caller's buffer.

aiohttp hands a body over as `bytes` blocks: on the event-loop thread every block is copied from
the transport's buffer into a `bytes`, again by the parser into a body piece, and once more by the
caller. Here asyncio's `BufferedProtocol` has the kernel write the body into the caller's memory,
and nothing else copies it. The S3 store fetches chunks this way (through a presigned URL, so
aioboto3 still signs every request); everything else goes through aioboto3.

Only what a GetObject response needs: a `200` with a Content-Length body, keep-alive connections
reused per host, TLS with the system's CAs (or AWS_CA_BUNDLE's). A response outside that is refused with
`UnsupportedResponse`, an error status with `HttpStatusError` (its S3 error code parsed out).
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

HEAD_MAX = 64 << 10  # response head (status line + headers), and what is read beyond it at once
ERROR_BODY_MAX = 64 << 10  # error bodies longer than this are not read (the connection is closed)
_CODE_RE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MESSAGE_RE = re.compile(rb"<Message>([^<]{0,512})</Message>")


class HttpStatusError(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        what = f"HTTP {status}" + (f" {code}" if code else "")
        super().__init__(what + (f": {message}" if message else ""))
        self.status = status
        self.code = code


class BodyTooBig(Exception):
    def __init__(self, length: int, room: int) -> None:
        super().__init__(f"{length} bytes, more than the {room} expected")
        self.length = length


class IncompleteBody(ConnectionError):
    """The connection ended before the whole body arrived (retryable, like any dropped connection)."""


class UnsupportedResponse(Exception):
    """A response this client does not read (chunked, no length, 1xx, ...): use a full HTTP client."""


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]
    keep_alive: bool

    @property
    def content_length(self) -> int | None:
        raw = self.headers.get("content-length")
        if raw is None:
            return None
        if not raw.isdigit():
            raise ConnectionError(f"bad Content-Length {raw!r}")
        return int(raw)


def parse_head(raw: bytes) -> Head:
    """The status line and headers (without the blank line); `ConnectionError` if garbled."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ConnectionError(f"garbled header line {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name in headers and name == "content-length" and headers[name] != value:
            raise ConnectionError("two different Content-Length headers")
        headers[name] = value
    conn = headers.get("connection", "").lower()
    keep = conn != "close" if parts[0] == "HTTP/1.1" else conn == "keep-alive"
    return Head(int(parts[1]), headers, keep)


def s3_error(status: int, body: bytes) -> HttpStatusError:
    code = _CODE_RE.search(body)
    msg = _MESSAGE_RE.search(body)
    return HttpStatusError(
        status, code.group(1).decode("latin-1") if code else "", msg.group(1).decode("latin-1") if msg else ""
    )


class _Conn(asyncio.BufferedProtocol):
    """One connection. Reads go into `_head` until the head is complete, then (after `read_body`)
    into the caller's buffer, and between requests into `_head` again, where any byte, or the end
    of the stream, marks the connection dead."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(HEAD_MAX)
        self._hn = 0
        self._head_end = -1
        self._body: memoryview | None = None
        self._pos = 0
        self._waiter: asyncio.Future[None] | None = None
        self.dead: ConnectionError | None = None
        self.idle_since = time.monotonic()
        self.last_read = 0.0  # monotonic time of the last bytes received

    # -- asyncio callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not asyncio's classes)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None and self._pos < len(self._body):
            return self._body[self._pos :]
        if self._hn < HEAD_MAX:
            return memoryview(self._head)[self._hn :]
        return memoryview(self._head)  # (head overflow: buffer_updated says so)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_read = time.monotonic()
        if self._body is not None:
            self._pos += nbytes
            if self._pos >= len(self._body):
                self._body = None
                self._wake()
            return
        if self._waiter is None or self._waiter.done():  # idle: nothing may arrive between requests
            self._die(ConnectionError("data arrived on an idle connection"))
            return
        self._hn += nbytes
        end = self._head.find(b"\r\n\r\n", 0, self._hn)
        if end >= 0:
            self._head_end = end
            assert self.transport is not None
            self.transport.pause_reading()  # until the caller says where the body goes
            self._wake()
        elif self._hn >= HEAD_MAX:
            self._die(ConnectionError(f"response head longer than {HEAD_MAX} bytes"))

    def eof_received(self) -> bool:
        self._die(ConnectionError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._die(exc or ConnectionError("the connection closed"))

    # -- for the getter --
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _die(self, exc: BaseException) -> None:
        if not isinstance(exc, ConnectionError):  # e.g. ssl.SSLError from a broken TLS record
            err = ConnectionError(f"{type(exc).__name__}: {exc}")
            err.__cause__ = exc
            exc = err
        if self.dead is None:
            self.dead = exc
        self._body = None  # never write into a caller's buffer again
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        self._die(ConnectionError("aborted"))

    async def _wait(self, idle_s: float) -> None:
        """Until the head or body is in; `TimeoutError` after `idle_s` without a byte."""
        self._waiter = fut = asyncio.get_running_loop().create_future()
        try:
            while True:
                await asyncio.wait([fut], timeout=idle_s)  # (fut itself is never cancelled here)
                if fut.done():
                    fut.result()  # raises what the connection died of
                    return
                if time.monotonic() - self.last_read >= idle_s:
                    raise TimeoutError(f"no byte for {idle_s:g} s")
        finally:
            self._waiter = None

    async def request(self, head: bytes, idle_s: float) -> Head:
        """Send a request head; the response's head once it has arrived."""
        assert self.transport is not None
        if self.dead is not None:
            raise ConnectionError(f"connection dead: {self.dead}")
        self._hn, self._head_end, self._pos = 0, -1, 0
        self.last_read = time.monotonic()
        self.transport.write(head)
        await self._wait(idle_s)
        return parse_head(bytes(self._head[: self._head_end]))

    @property
    def answered(self) -> bool:
        """Some of the response to the last request has arrived."""
        return self._hn > 0

    async def read_body(self, into: memoryview, idle_s: float) -> None:
        """Read the body, exactly `len(into)` bytes, into `into`."""
        assert self.transport is not None
        start = self._head_end + 4
        extra = self._hn - start
        if extra > len(into):
            raise ConnectionError(f"{extra - len(into)} bytes beyond the body")
        into[:extra] = self._head[start : self._hn]
        self._pos = extra
        if extra < len(into):
            self._body = into
            self.transport.resume_reading()
            try:
                await self._wait(idle_s)
            except BaseException as e:
                self._body = None
                if isinstance(e, ConnectionError):
                    raise IncompleteBody(f"{e}, after {self._pos} of {len(into)} body bytes") from None
                raise
        else:
            self.transport.resume_reading()
        self._hn = 0
        self.idle_since = time.monotonic()


@dataclass
class GetterStats:
    connections: int = 0  # opened
    requests: int = 0
    reused: int = 0  # requests sent on a connection kept from an earlier one
    resent: int = 0  # requests sent again because a kept connection closed under them


class HttpGetter:
    """Keep-alive connections per host; `get_into` one body at a time on each."""

    def __init__(
        self,
        *,
        max_idle: int = 32,  # connections kept between requests, per host
        idle_s: float = 10.0,  # a connection idle longer is closed rather than reused
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,  # the longest wait for the next byte of a response
        ssl_context: ssl.SSLContext | None = None,  # https; None: the default, with AWS_CA_BUNDLE
    ) -> None:
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.ssl_context = ssl_context
        self.stats = GetterStats()
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._closed = False

    async def get_into(self, url: str, buf: memoryview) -> int:
        """GET `url`; its body (status 200) lands in `buf`, and its length is returned."""
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UnsupportedResponse(f"cannot GET {u.scheme}:// URLs")
        if buf.format != "B":
            buf = buf.cast("B")
        port = u.port or (443 if u.scheme == "https" else 80)
        where = (u.scheme, u.hostname, port)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        head = (
            f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nUser-Agent: snapscale\r\n"
            "Accept-Encoding: identity\r\n\r\n"
        ).encode("latin-1")
        fresh = False
        while True:
            conn, reused = await self._conn(where, fresh)
            self.stats.requests += 1
            ok = False
            try:
                n, ok = await self._exchange(conn, head, buf)
                return n
            except ConnectionError:
                if not reused or conn.answered:
                    raise
                # A kept connection the server closed as the request went out (its FIN not yet
                # seen): nothing was answered, so send it again at once on a fresh one.
                self.stats.resent += 1
                fresh = True
            finally:
                self._put_back(where, conn, ok)

    def _put_back(self, where: tuple[str, str, int], conn: _Conn, ok: bool) -> None:
        idle = self._idle.setdefault(where, [])
        if ok and conn.dead is None and not self._closed and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.abort()

    async def _exchange(self, conn: _Conn, head: bytes, buf: memoryview) -> tuple[int, bool]:
        """(body length, whether the connection may carry another request)."""
        h = await conn.request(head, self.read_timeout_s)
        length = h.content_length
        if h.status < 200 or 300 <= h.status < 400:
            raise UnsupportedResponse(f"an HTTP {h.status} answer (interim or redirect)")
        if h.status != 200:
            if length is not None and length <= ERROR_BODY_MAX:
                body = bytearray(length)
                await conn.read_body(memoryview(body), self.read_timeout_s)
                raise s3_error(h.status, bytes(body))
            raise HttpStatusError(h.status)
        if "chunked" in h.headers.get("transfer-encoding", "").lower() or length is None:
            raise UnsupportedResponse("a 200 without a Content-Length (chunked or to the end of the stream)")
        if length > len(buf):
            raise BodyTooBig(length, len(buf))
        await conn.read_body(buf[:length], self.read_timeout_s)
        return length, h.keep_alive

    async def _conn(self, where: tuple[str, str, int], fresh: bool) -> tuple[_Conn, bool]:
        """A kept connection (and True) unless `fresh`, or a new one."""
        idle = self._idle.get(where, [])
        now = time.monotonic()
        while idle and not fresh:
            c = idle.pop()  # the most recently used: the least likely to have been closed
            if c.dead is None and now - c.idle_since < self.idle_s:
                self.stats.reused += 1
                return c, True
            c.abort()
        scheme, host, port = where
        ctx = None
        if scheme == "https":
            # The system's CAs, or the bundle botocore is told to trust (as aioboto3's calls are).
            ctx = self.ssl_context = self.ssl_context or ssl.create_default_context(
                cafile=os.environ.get("AWS_CA_BUNDLE") or None
            )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _t, conn = await loop.create_connection(
                    _Conn, host, port, ssl=ctx, server_hostname=host if ctx else None
                )
        except ssl.SSLCertVerificationError:
            raise  # a certificate we do not trust: trying again will not help
        except OSError as e:
            if isinstance(e, ConnectionError):
                raise
            # DNS failures, unreachable networks, every address refusing: retryable, like a reset.
            raise ConnectionError(f"cannot connect to {host}:{port}: {e}") from e
        self.stats.connections += 1
        return conn, False

    def close(self) -> None:
        """Close the kept connections; those of requests still running close as they end."""
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
