"""How the bus meets a server that is not there, has no JetStream, or is only read from, on real
nats-servers: an operator's verb fails fast with one clear error, a read leaves the server as it
was, and closing the connection ourselves says nothing."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import NatsServer, start_nats
from nats.js.errors import NotFoundError

from snapscale.demo.procs import free_port, wait_port
from snapscale.shared import bus
from snapscale.shared.bus import Bucket
from snapscale.shared.core.errors import UnavailableError
from snapscale.shared.core.settings import NatsUrlError, Settings


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nats://127.0.0.1:{port}", "is unreachable: [Errno 111]"),
        ("nats://no-such-host.invalid:4222", "is unreachable"),
    ],
)
async def test_an_operator_gives_up_fast_on_an_unreachable_server(url: str, needle: str) -> None:
    s = Settings(nats_url=url.format(port=free_port()))
    t0 = time.monotonic()
    with pytest.raises(UnavailableError) as got:
        await bus.open_bus(s, "t", operator=True)
    assert time.monotonic() - t0 < bus.client.OPERATOR_CONNECT_S + 1
    assert needle in str(got.value)
    assert "\n" not in str(got.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "127.0.0.1"])
def test_a_url_that_names_no_nats_server_is_refused_with_the_settings(url: str) -> None:
    # checked once, where SNAPSCALE_NATS_URL is read; the CLI answers it as unavailable (exit 1)
    with pytest.raises(NatsUrlError, match="is not a NATS URL"):
        Settings(nats_url=url)


async def test_no_jetstream_is_said_in_one_line(no_jetstream: NatsServer) -> None:
    with pytest.raises(UnavailableError, match=r"has no JetStream: start nats-server with -js"):
        await bus.open_bus(Settings(nats_url=no_jetstream.url), "t", operator=True)


async def test_a_reader_creates_no_stream_and_no_bucket(settings: Settings) -> None:
    reader = await bus.open_bus(settings, "reader", create=False, operator=True)
    try:
        assert reader.kv == {}
        with pytest.raises(NotFoundError):
            await reader.js.stream_info(reader.subjects.cmd_stream)
        with pytest.raises(NotFoundError):
            await reader.js.key_value(reader.subjects.bucket(Bucket.DEPLOYMENTS))
    finally:
        await reader.close()
    writer = await bus.open_bus(settings, "writer")  # a writer creates them; a reader then sees them
    await writer.close()
    reader = await bus.open_bus(settings, "reader", create=False, operator=True)
    await reader.close()
    assert set(reader.kv) == set(Bucket)


async def test_closing_our_own_connection_logs_nothing(
    settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.DEBUG, logger="snapscale"):
        b = await bus.open_bus(settings, "quiet")
        await b.close()
        b = await bus.open_bus(settings, "quiet-too", operator=True)
        await b.nc.close()
    assert [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()] == []
    # a server that goes away is still reported by a service's connection
    srv = start_nats(tmp_path)
    b = await bus.open_bus(replace(settings, nats_url=srv.url), "loud")
    try:
        with caplog.at_level(logging.WARNING, logger="snapscale"):
            srv.proc.terminate()
            srv.proc.wait(10)
            t0 = time.monotonic()
            while not any("disconnected" in r.getMessage() for r in caplog.records):
                assert time.monotonic() - t0 < 10, "no disconnect reported"
                await asyncio.sleep(0.05)
    finally:
        await b.nc.close()


@pytest.fixture
def nats_with_a_password() -> Iterator[str]:
    exe = Path(sys.executable).parent / "nats-server"
    port = free_port()
    argv = [str(exe), "-a", "127.0.0.1", "-p", str(port), "--user", "u", "--pass", "p"]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_refused_credentials_are_said_as_such(nats_with_a_password: str) -> None:
    """A server that wants credentials we lack is not 'unreachable': the error says it refused us."""
    refused = r"refused our credentials: nats: 'Authorization Violation'"
    with pytest.raises(UnavailableError, match=refused):
        await bus.open_bus(Settings(nats_url=nats_with_a_password), "t", operator=True)
