"""The GET that reads a body straight into a buffer (shared/httpget.py), against a loopback HTTP
server each test scripts: keep-alive reuse, a dead idle connection, bodies cut or too big, error
statuses, responses it does not read, cancellation mid-body and a server that never answers."""

from __future__ import annotations

import array
import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from snapscale.shared.store import httpget
from snapscale.shared.store.httpget import HttpGetter, parse_head

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Runner = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Each test in a fresh loop of both kinds: the services run on uvloop, whose transports call
    a BufferedProtocol differently from asyncio's."""

    def runner(body: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            await body()

        if request.param == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())

    return runner


class Server:
    """A loopback server; `handler` answers each connection; `conns` counts them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns += 1
        try:
            await self.handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/bucket/key?X-Amz-Signature=abc"


@contextlib.asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    s = Server(handler)
    s.server = await asyncio.start_server(s._serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield s
    finally:
        s.server.close()


def self_signed(d: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in `d`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "snapscale test")])
    now = datetime.datetime.now(datetime.UTC)
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([ip]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return d / "cert.pem", d / "key.pem"


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def requests(r: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        try:
            yield await r.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return


def answering(response: bytes, *, once: bool = False) -> Handler:
    """A handler that answers every request on a connection with `response` (`once`: the first,
    then closes the connection)."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async for _ in requests(r):
            w.write(response)
            await w.drain()
            if once:
                return

    return handler


def test_bodies_land_in_the_buffer_over_one_kept_connection(run: Runner) -> None:
    run(_bodies_land_in_the_buffer_over_one_kept_connection)


async def _bodies_land_in_the_buffer_over_one_kept_connection() -> None:
    bodies = [os.urandom(n) for n in (1, 70_000, 3_000_000)]
    heads: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async for head in requests(r):
            heads.append(head)
            w.write(ok(bodies[len(heads) - 1]))
            await w.drain()

    async with serving(handler) as s:
        g = HttpGetter()
        for body in bodies:
            buf = bytearray(b"x" * (len(body) + 5))
            assert await g.get_into(s.url, memoryview(buf)) == len(body)
            assert buf[: len(body)] == body and buf[len(body) :] == b"xxxxx"
        g.close()
    assert s.conns == 1 and (g.stats.connections, g.stats.requests, g.stats.reused) == (1, 3, 2)
    assert heads[0].startswith(b"GET /bucket/key?X-Amz-Signature=abc HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in heads[0]


def test_a_connection_the_server_closed_while_idle_is_not_reused(run: Runner) -> None:
    run(_a_connection_the_server_closed_while_idle_is_not_reused)


async def _a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    # One answer a connection, then close, as a server ending idle connections does.
    async with serving(answering(ok(b"one"), once=True)) as s:
        g = HttpGetter()
        for _ in range(3):
            buf = bytearray(3)
            assert await g.get_into(s.url, memoryview(buf)) == 3 and buf == b"one"
            await asyncio.sleep(0.05)  # the loop sees the server's FIN on the idle connection
        g.close()
    assert s.conns == 3 and g.stats.reused == 0


def test_connection_close_and_http_1_0_are_honoured(run: Runner) -> None:
    run(_connection_close_and_http_1_0_are_honoured)


async def _connection_close_and_http_1_0_are_honoured() -> None:
    assert not parse_head(b"HTTP/1.1 200 OK\r\nConnection: close").keep_alive
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1").keep_alive
    assert not parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1").keep_alive
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive").keep_alive
    with pytest.raises(ConnectionError, match=r"not an HTTP/1\.x status line"):
        parse_head(b"SSH-2.0-OpenSSH")
    with pytest.raises(ConnectionError, match="two different Content-Length"):
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2")

    async with serving(answering(ok(b"ab", b"Connection: close\r\n"))) as s:
        g = HttpGetter()
        for _ in range(2):
            assert await g.get_into(s.url, memoryview(bytearray(2))) == 2
        g.close()
    assert s.conns == 2


def test_a_body_cut_mid_way_says_how_far_it_got(run: Runner) -> None:
    run(_a_body_cut_mid_way_says_how_far_it_got)


async def _a_body_cut_mid_way_says_how_far_it_got() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 400_000)
        await w.drain()
        w.transport.abort()

    async with serving(handler) as s:
        g = HttpGetter()
        with pytest.raises(httpget.IncompleteBody, match="after 400000 of 1000000 body bytes"):
            await g.get_into(s.url, memoryview(bytearray(1_000_000)))
        g.close()


def test_cancelled_mid_body_nothing_more_is_written_into_the_buffer(run: Runner) -> None:
    run(_cancelled_mid_body_nothing_more_is_written_into_the_buffer)


async def _cancelled_mid_body_nothing_more_is_written_into_the_buffer() -> None:
    half_sent, go_on, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"a" * 100_000)
        await w.drain()
        half_sent.set()
        await go_on.wait()
        with contextlib.suppress(ConnectionError):
            w.write(b"b" * 1_900_000)
            await w.drain()
        done.set()

    async with serving(handler) as s:
        g = HttpGetter()
        buf = bytearray(2_000_000)
        t = asyncio.create_task(g.get_into(s.url, memoryview(buf)))
        await half_sent.wait()
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        seen = bytes(buf)
        go_on.set()
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.05)
        assert bytes(buf) == seen and b"b" not in buf  # the caller may reuse it at once
        assert buf.count(b"a") == 100_000
        g.close()


def test_error_statuses_carry_the_s3_code(run: Runner) -> None:
    run(_error_statuses_carry_the_s3_code)


async def _error_statuses_carry_the_s3_code() -> None:
    xml = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>"

    slow_down = b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s" % (len(xml), xml)
    async with serving(answering(slow_down)) as s:
        g = HttpGetter()
        with pytest.raises(httpget.HttpStatusError, match="HTTP 503 SlowDown: Please reduce") as ei:
            await g.get_into(s.url, memoryview(bytearray(10)))
        assert (ei.value.status, ei.value.code) == (503, "SlowDown")
        g.close()


def test_a_body_larger_than_the_buffer_is_refused_and_its_connection_dropped(run: Runner) -> None:
    run(_a_body_larger_than_the_buffer_is_refused_and_its_connection_dropped)


async def _a_body_larger_than_the_buffer_is_refused_and_its_connection_dropped() -> None:
    async with serving(answering(ok(b"z" * 100))) as s:
        g = HttpGetter()
        buf = bytearray(99)
        with pytest.raises(httpget.BodyTooBig, match="100 bytes, more than the 99 expected"):
            await g.get_into(s.url, memoryview(buf))
        assert buf == bytearray(99)
        assert await g.get_into(s.url, memoryview(bytearray(100))) == 100
        words = array.array("H", bytes(100))  # a buffer of 50 two-byte items holds 100 bytes
        assert await g.get_into(s.url, memoryview(words)) == 100 and words.tobytes() == b"z" * 100
        g.close()
    assert g.stats.connections == 2 and g.stats.reused == 1


def test_responses_it_does_not_read_are_refused_as_such(run: Runner) -> None:
    run(_responses_it_does_not_read_are_refused_as_such)


async def _responses_it_does_not_read_are_refused_as_such() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    async with serving(answering(chunked, once=True)) as s:
        g = HttpGetter()
        with pytest.raises(httpget.UnsupportedResponse, match="without a Content-Length"):
            await g.get_into(s.url, memoryview(bytearray(10)))
        with pytest.raises(httpget.UnsupportedResponse, match="ftp://"):
            await g.get_into("ftp://127.0.0.1/x", memoryview(bytearray(10)))
        g.close()

    for status in (b"100 Continue", b"301 Moved Permanently"):
        async with serving(answering(b"HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n" % status, once=True)) as s:
            g = HttpGetter()
            with pytest.raises(httpget.UnsupportedResponse, match=f"HTTP {status[:3].decode()} answer"):
                await g.get_into(s.url, memoryview(bytearray(10)))
            g.close()


def test_bytes_beyond_the_body_kill_the_connection(run: Runner) -> None:
    run(_bytes_beyond_the_body_kill_the_connection)


async def _bytes_beyond_the_body_kill_the_connection() -> None:
    async with serving(answering(ok(b"abc") + b"garbage")) as s:
        g = HttpGetter()
        seen: list[str] = []
        for _ in range(2):
            buf = bytearray(3)
            try:
                await g.get_into(s.url, memoryview(buf))
                seen.append(buf.decode())
            except ConnectionError as e:
                seen.append(str(e))
            await asyncio.sleep(0.05)
        g.close()
    # Whether the garbage arrives with the body or after it, it is never taken as a body.
    assert all(x == "abc" or x.endswith("bytes beyond the body") for x in seen), seen
    assert g.stats.reused == 0 and s.conns == 2


def test_a_response_times_out_when_it_stalls_not_while_it_flows(run: Runner) -> None:
    run(_a_response_times_out_when_it_stalls_not_while_it_flows)


async def _a_response_times_out_when_it_stalls_not_while_it_flows() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async for head in requests(r):
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            for _ in range(5 if b"flows" in head else 2):  # 0.5 s in all, 0.1 s between bytes
                await asyncio.sleep(0.1)
                w.write(b"ab")
                await w.drain()
            if b"stalls" in head:
                await asyncio.sleep(10)

    async with serving(handler) as s:
        g = HttpGetter(read_timeout_s=0.3)
        assert await g.get_into(s.url + "&flows", memoryview(bytearray(10))) == 10
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError, match=r"no byte for 0\.3 s"):
            await g.get_into(s.url + "&stalls", memoryview(bytearray(10)))
        assert 0.2 + 0.3 <= loop.time() - t0 < 2
        g.close()


def test_a_kept_connection_closed_under_a_request_is_resent_at_once(run: Runner) -> None:
    run(_a_kept_connection_closed_under_a_request_is_resent_at_once)


async def _a_kept_connection_closed_under_a_request_is_resent_at_once() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        served = 0
        async for _ in requests(r):
            if served == 1:
                return  # the second request on a connection: closed unanswered
            w.write(ok(b"abc"))
            await w.drain()
            served += 1

    async with serving(handler) as s:
        g = HttpGetter()
        for _ in range(3):
            buf = bytearray(3)
            assert await g.get_into(s.url, memoryview(buf)) == 3 and buf == b"abc"
        g.close()
    assert (g.stats.requests, g.stats.resent, g.stats.connections) == (5, 2, 3)

    async def never(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")  # then close, unanswered

    async with serving(never) as s:
        g = HttpGetter()
        with pytest.raises(ConnectionError):  # a fresh connection is not resent: retrying is the caller's
            await g.get_into(s.url, memoryview(bytearray(3)))
        g.close()
    assert (g.stats.requests, g.stats.resent) == (1, 0)


def test_failures_to_connect_are_connection_errors(run: Runner) -> None:
    run(_failures_to_connect_are_connection_errors)


async def _failures_to_connect_are_connection_errors() -> None:
    g = HttpGetter(connect_timeout_s=5)
    # DNS says no (socket.gaierror, an OSError but not a ConnectionError): retryable all the same.
    with pytest.raises(ConnectionError, match=r"cannot connect to snapscale-test\.invalid:80"):
        await g.get_into("http://snapscale-test.invalid/b/k", memoryview(bytearray(3)))


def test_a_tls_error_mid_body_is_a_connection_error() -> None:
    async def main() -> None:
        conn = httpget._Conn()
        waiter = asyncio.get_running_loop().create_future()
        conn._waiter = waiter
        conn.connection_lost(ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]"))
        with pytest.raises(ConnectionError, match=r"SSLError: .*BAD_RECORD_MAC") as ei:
            await waiter
        assert isinstance(ei.value.__cause__, ssl.SSLError) and conn.dead is ei.value

    asyncio.run(main())


def test_connections_of_requests_running_at_close_are_not_kept(run: Runner) -> None:
    run(_connections_of_requests_running_at_close_are_not_kept)


async def _connections_of_requests_running_at_close_are_not_kept() -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async for _ in requests(r):
            await asyncio.sleep(0.1)
            w.write(ok(b"abc"))
            await w.drain()
        closed.set()  # the client closed its end

    async with serving(handler) as s:
        g = HttpGetter()
        t = asyncio.create_task(g.get_into(s.url, memoryview(bytearray(3))))
        await asyncio.sleep(0.05)
        g.close()
        assert await t == 3
        await asyncio.wait_for(closed.wait(), 2)


def test_https_bodies_land_in_the_buffer_trusting_aws_ca_bundle(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    body = os.urandom(3_000_000)

    async def main() -> None:
        async with serving(answering(ok(body)), server_tls) as s:
            url = s.url.replace("http://", "https://")
            monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
            g = HttpGetter()
            with pytest.raises(ssl.SSLCertVerificationError):  # not a CA the system knows
                await g.get_into(url, memoryview(bytearray(len(body))))
            monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
            g = HttpGetter()
            for _ in range(2):
                buf = bytearray(len(body))
                assert await g.get_into(url, memoryview(buf)) == len(body) and buf == body
            g.close()
        assert (g.stats.connections, g.stats.reused) == (1, 1)

    run(main)
