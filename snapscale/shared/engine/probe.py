"""Readiness probes (HTTP 2xx, TCP connect, a file appearing) and HTTP hooks, each with a deadline.

A tiny HTTP/1.0 client on asyncio streams keeps the engine free of HTTP libraries. A probe
never kills anything: it reports, the engine decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from snapscale.shared.bus.spec import ReadySpec
from snapscale.shared.engine.errors import HookError, ReadyTimeout, SandboxExited

log = logging.getLogger(__name__)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return host, int(port)


def parse_response(data: bytes) -> tuple[int, bytes]:
    """Status code and body of an HTTP/1.x response read to EOF. Pure."""
    head, sep, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {data[:80]!r}")
    return int(parts[1]), body


async def http_request(
    method: str, endpoint: str, path: str, *, timeout_s: float, body: bytes = b""
) -> tuple[int, bytes]:
    """One request with `Connection: close`; the whole exchange must finish within `timeout_s`."""
    host, port = split_endpoint(endpoint)

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            req = (
                f"{method} {path} HTTP/1.0\r\nHost: {endpoint}\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            writer.write(req)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    return parse_response(await asyncio.wait_for(exchange(), timeout_s))


async def check_once(endpoint: str, ready: ReadySpec, *, base_dir: Path | None = None) -> str | None:
    """None when ready, else what is still missing."""
    per_try_s = max(1.0, ready.interval_s)
    if ready.http_path is not None:
        try:
            status, _ = await http_request("GET", endpoint, ready.http_path, timeout_s=per_try_s)
        except (OSError, TimeoutError, ValueError) as e:
            return f"GET {ready.http_path}: {e!r}"
        return None if 200 <= status < 300 else f"GET {ready.http_path} answered {status}"
    if ready.tcp:
        host, port = split_endpoint(endpoint)
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port), per_try_s)
        except (OSError, TimeoutError) as e:
            return f"TCP {endpoint}: {e!r}"
        w.close()
        return None
    if ready.file is not None:
        p = Path(ready.file)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return None if p.exists() else f"file {p} does not exist"
    return None  # no probe configured: started is ready


async def wait_ready(
    endpoint: str,
    ready: ReadySpec,
    *,
    alive: Callable[[], bool],
    log_tail: Callable[[], str],
    base_dir: Path | None = None,
    timeout_s: float | None = None,
) -> float:
    """Probe until ready; seconds waited. `alive` is polled so a crashed workload fails at once."""
    deadline_s = ready.timeout_s if timeout_s is None else timeout_s
    start = time.monotonic()
    last = "not probed"
    while True:
        if not alive():
            raise SandboxExited("ready", f"the sandbox exited before it was ready ({last})", log_tail())
        missing = await check_once(endpoint, ready, base_dir=base_dir)
        if missing is None:
            return time.monotonic() - start
        last = missing
        if time.monotonic() - start >= deadline_s:
            raise ReadyTimeout("ready", f"not ready after {deadline_s:g}s: {last}", log_tail())
        await asyncio.sleep(ready.interval_s)


async def run_hook(
    step: str, endpoint: str, path: str, *, timeout_s: float, log_tail: Callable[[], str], body: bytes = b""
) -> bytes:
    """POST the hook with `body`; its answer's body. A non-2xx answer, no answer or a missed
    deadline is a `HookError`."""
    try:
        status, answer = await http_request("POST", endpoint, path, timeout_s=timeout_s, body=body)
    except TimeoutError:
        raise HookError(step, f"POST {path} missed its {timeout_s:g}s deadline", log_tail()) from None
    except (OSError, ValueError) as e:
        raise HookError(step, f"POST {path} failed: {e!r}", log_tail()) from None
    if not 200 <= status < 300:
        text = answer[:300].decode(errors="replace").strip()
        raise HookError(step, f"POST {path} answered {status}: {text}", log_tail())
    return answer
