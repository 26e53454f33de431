"""The demo's live parts: the requests it sends through the gateway, the events it follows, the
status line it shows. Nothing here decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from nats.aio.msg import Msg

from snapscale.demo.report import DemoState
from snapscale.shared import bus
from snapscale.shared.bus import CheckpointEvent, HostHeartbeat, ReplicaEvent, decode_message
from snapscale.shared.core.errors import MessageError

log = logging.getLogger(__name__)


async def follow(b: bus.Bus, state: DemoState, out: Console) -> None:
    """Replica and checkpoint events (JetStream, from the start) and host heartbeats into `state`."""

    async def on_replica(m: Msg) -> None:
        with contextlib.suppress(MessageError):
            done = state.apply_replica(decode_message(m.data, ReplicaEvent))
            if done is not None:
                log.info("scale-up done: %s", done.to_plain())

    async def on_checkpoint(m: Msg) -> None:
        with contextlib.suppress(MessageError):
            ev = decode_message(m.data, CheckpointEvent)
            state.apply_checkpoint(ev)
            if ev.ok and ev.checkpoint_id and not ev.skipped:
                total, new = ev.sizes.get("total", 0) / 1e6, ev.sizes.get("new", 0) / 1e6
                out.say(
                    f"checkpoint {ev.checkpoint_id} frozen: {total:.1f} MB, {new:.1f} MB new in the store"
                )

    async def on_host(m: Msg) -> None:
        with contextlib.suppress(MessageError):
            state.apply_host(decode_message(m.data, HostHeartbeat))

    await b.js.subscribe(b.subjects.evt_replica(state.deployment), cb=on_replica, ordered_consumer=True)
    await b.js.subscribe(b.subjects.evt_checkpoint(state.deployment), cb=on_checkpoint, ordered_consumer=True)
    await b.nc.subscribe(b.subjects.evt_host_all(), cb=on_host)


@dataclass
class FirstAnswer:
    """A user's view of one scale-up: when the first request went out, when an answer came back."""

    sent_at: float
    answered_at: float | None = None
    status: int = 0
    text: str = ""
    tries: int = 0  # requests it took: a 503 (held too long, queue full) is sent again


async def first_answer(http: aiohttp.ClientSession, url: str, n: int, deadline_s: float) -> FirstAnswer:
    """`n` GETs to `url` (through the gateway) at once, each sent again after a 503 with the wait its
    Retry-After asks, until one is answered; the first answer, or the last refusal at the deadline."""
    out = FirstAnswer(sent_at=time.time())
    done = asyncio.Event()

    async def ask() -> None:
        while not done.is_set() and time.time() - out.sent_at < deadline_s:
            out.tries += 1
            try:
                async with http.get(url) as r:
                    body = " ".join((await r.text()).split())
                    status, after = r.status, r.headers.get("Retry-After", "1")
            except aiohttp.ClientError as e:
                status, body, after = 0, f"no answer ({e})", "1"
            if status == 200:
                if out.answered_at is None:
                    out.answered_at, out.status, out.text = time.time(), status, body
                done.set()
                return
            out.status, out.text = status, body
            if status == 404 and out.answered_at is None:
                out.sent_at = time.time()  # the gateway has not seen the spec yet: not the user's wait
            await asyncio.sleep(min(float(after) if after.isdigit() else 1.0, 5.0))

    await asyncio.gather(*(ask() for _ in range(max(1, n))))
    return out


class Console:
    """A live status line on a terminal; plain lines (only on change) anywhere else."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = ""
        self._shown = False

    def say(self, line: str) -> None:
        self.clear()
        print(line, file=self.stream, flush=True)

    def status(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()
            self._shown = True
            return
        # Off a terminal, print a state only when it changes (not the clock).
        key = line.split("] ", 1)[-1]
        if key != self._last:
            self._last = key
            print(line, file=self.stream, flush=True)

    def clear(self) -> None:
        if self.tty and self._shown:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + " " * width + "\r")
            self.stream.flush()
            self._shown = False
