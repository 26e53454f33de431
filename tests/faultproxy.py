"""A loopback HTTP/1.1 reverse proxy that injects faults and models a remote object store.

Faults: answer the next N requests (or all for T seconds) with an S3-style error status, drop
the connection instead of answering, or flip a byte in a response body. Model: a delay before
each response's first byte and a per-connection bandwidth cap on response bodies.
Run in-process (`await FaultProxy(...).start()`) or as a script (`--help`). The bench models
the remote store with bench/relay.py instead, which moves bodies with splice(2) for less CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field

_ERR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code>'
    b"<Message>injected by faultproxy</Message></Error>"
)
_REASONS = {500: b"Internal Server Error", 503: b"Slow Down", 403: b"Forbidden", 404: b"Not Found"}


@dataclass
class Fault:
    kind: str  # "status", "reset", "corrupt" (a bit flipped mid-body) or "cut" (dropped mid-body)
    remaining: int | None = None  # requests left to hit; None: until `until`
    until: float | None = None  # monotonic deadline
    status: int = 503
    code: bytes = b"SlowDown"
    method: str | None = None  # only requests with this method
    path_contains: str | None = None

    def matches(self, method: str, path: str, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.method is not None and method != self.method:
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass
class Stats:
    requests: int = 0
    injected: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    bytes_out: int = 0
    in_flight: int = 0  # requests read and not yet answered
    max_in_flight: int = 0


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        first_byte_s: float = 0.0,
        bytes_per_s: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        u = upstream.removeprefix("http://").rstrip("/")
        self.up_host, _, up_port = u.partition(":")
        self.up_port = int(up_port or 80)
        self.first_byte_s = first_byte_s
        self.bytes_per_s = bytes_per_s
        self.host = host
        self.port = port
        self.faults: list[Fault] = []
        self.stats = Stats()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()

    # -- fault controls --
    def fail_next(self, n: int, status: int = 503, code: bytes = b"SlowDown", **match: str) -> Fault:
        return self._add(Fault("status", remaining=n, status=status, code=code, **match))  # type: ignore[arg-type]

    def fail_for(self, seconds: float, status: int = 503, code: bytes = b"SlowDown", **match: str) -> Fault:
        f = Fault("status", until=time.monotonic() + seconds, status=status, code=code, **match)  # type: ignore[arg-type]
        return self._add(f)

    def reset_next(self, n: int, **match: str) -> Fault:
        return self._add(Fault("reset", remaining=n, **match))  # type: ignore[arg-type]

    def corrupt_next(self, n: int, **match: str) -> Fault:
        return self._add(Fault("corrupt", remaining=n, **match))  # type: ignore[arg-type]

    def cut_next(self, n: int, **match: str) -> Fault:
        """The next `n` matching responses stop half-way through the body and the connection drops."""
        return self._add(Fault("cut", remaining=n, **match))  # type: ignore[arg-type]

    def clear(self) -> None:
        self.faults.clear()

    def _add(self, f: Fault) -> Fault:
        self.faults.append(f)
        return f

    def _pick(self, method: str, path: str) -> Fault | None:
        now = time.monotonic()
        for f in self.faults:
            if f.matches(method, path, now):
                if f.remaining is not None:
                    f.remaining -= 1
                return f
        return None

    # -- the proxy --
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                t_req = time.monotonic()
                method, path, headers, lines = _parse_head(head)
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    lines = [ln for ln in lines if not ln.lower().startswith(b"expect:")]
                body = await _read_body(reader, headers, is_request=True)
                self.stats.requests += 1
                self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
                self.stats.in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
                try:
                    fault = self._pick(method, path)
                    if fault is not None and fault.kind == "reset":
                        self.stats.injected += 1
                        with contextlib.suppress(Exception):
                            writer.transport.abort()
                        return
                    if fault is not None and fault.kind == "status":
                        self.stats.injected += 1
                        err = _ERR_BODY % fault.code
                        reason = _REASONS.get(fault.status, b"Error")
                        writer.write(
                            b"HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
                            % (fault.status, reason, len(err), err)
                        )
                        await writer.drain()
                        continue
                    if up is None:
                        up = await asyncio.open_connection(self.up_host, self.up_port, limit=1 << 20)
                    up[1].write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                    await up[1].drain()
                    rhead = await up[0].readuntil(b"\r\n\r\n")
                    status, rheaders = _parse_status(rhead)
                    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                    chunked = "chunked" in rheaders.get("transfer-encoding", "").lower()
                    length = int(rheaders["content-length"]) if "content-length" in rheaders else None
                    up_closes = rheaders.get("connection", "").lower() == "close" or (
                        length is None and not chunked and not no_body
                    )
                    rbody = b""
                    if not no_body and (chunked or length is None):
                        rbody = await _read_body(up[0], rheaders, is_request=False)
                        if not chunked:
                            length = len(rbody)
                    # Keep the client's connection alive even where the upstream (werkzeug) closes
                    # its own after every response: a remote object store keeps connections open.
                    out_lines = [ln for ln in rhead[:-4].split(b"\r\n") if not ln.lower().startswith(
                        (b"connection:", b"content-length:", b"keep-alive:"))]  # fmt: skip
                    if length is not None:
                        out_lines.append(b"Content-Length: %d" % length)
                    head_out = b"\r\n".join(out_lines) + b"\r\n\r\n"
                    corrupt = fault is not None and fault.kind == "corrupt"
                    if fault is not None and fault.kind == "cut" and length:
                        self.stats.injected += 1
                        half = rbody[: length // 2] if rbody else await up[0].readexactly(length // 2)
                        await self._send(writer, [head_out, half])
                        writer.transport.abort()
                        return
                    wait = self.first_byte_s - (time.monotonic() - t_req)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if no_body or rbody or not length:
                        if corrupt and rbody:
                            self.stats.injected += 1
                            b = bytearray(rbody)
                            b[len(b) // 2] ^= 0xFF
                            rbody = bytes(b)
                        await self._send(writer, [head_out, rbody])
                    else:
                        await self._stream(writer, head_out, up[0], length, corrupt)
                    if up_closes:
                        up[1].close()
                        up = None
                finally:
                    self.stats.in_flight -= 1
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # stop(): end quietly (asyncio logs a handler task that ends cancelled)
        finally:
            self._conns.discard(task)
            if up is not None:
                up[1].close()
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, parts: list[bytes]) -> None:
        for p in parts:
            writer.write(p)
            self.stats.bytes_out += len(p)
        await writer.drain()

    async def _stream(
        self, writer: asyncio.StreamWriter, head: bytes, up: asyncio.StreamReader, length: int, corrupt: bool
    ) -> None:
        """Relay a body of `length` bytes as it arrives, paced to `bytes_per_s` if set."""
        writer.write(head)
        t0 = time.monotonic()
        sent = 0
        flip_at = length // 2 if corrupt else -1
        while sent < length:
            piece = await up.readexactly(min(256 << 10, length - sent))
            if sent <= flip_at < sent + len(piece):
                self.stats.injected += 1
                b = bytearray(piece)
                b[flip_at - sent] ^= 0xFF
                piece = bytes(b)
            writer.write(piece)
            sent += len(piece)
            self.stats.bytes_out += len(piece)
            await writer.drain()
            if self.bytes_per_s:
                ahead = sent / self.bytes_per_s - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], list[bytes]]:
    lines = head[:-4].split(b"\r\n")
    method, path, _ver = lines[0].decode("latin-1").split(" ", 2)
    return method, path, _headers(lines[1:]), lines


def _parse_status(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    return int(lines[0].split(b" ", 2)[1]), _headers(lines[1:])


def _headers(lines: list[bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for ln in lines:
        k, _, v = ln.decode("latin-1").partition(":")
        out[k.strip().lower()] = v.strip()
    return out


async def _read_body(r: asyncio.StreamReader, headers: dict[str, str], *, is_request: bool) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        while True:
            size_line = await r.readuntil(b"\r\n")
            parts.append(size_line)
            n = int(size_line.split(b";")[0].strip(), 16)
            if n == 0:
                while True:  # trailers, then the blank line
                    t = await r.readuntil(b"\r\n")
                    parts.append(t)
                    if t == b"\r\n":
                        return b"".join(parts)
            parts.append(await r.readexactly(n + 2))
    if "content-length" in headers:
        return await r.readexactly(int(headers["content-length"]))
    return b"" if is_request else await r.read()


async def _main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--first-byte-ms", type=float, default=0.0)
    p.add_argument("--mb-per-s", type=float, default=0.0, help="per-connection response bandwidth, 0: none")
    a = p.parse_args()
    proxy = FaultProxy(
        a.upstream, first_byte_s=a.first_byte_ms / 1000, bytes_per_s=a.mb_per_s * 1e6 or None, port=a.port
    )
    await proxy.start()
    print(proxy.port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop  # the bench runs the proxy in its own process: the faster loop costs less CPU

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_main())
