"""The demo's live parts: the traffic it plays, the events it follows, the status line it shows.

Traffic goes out as a gateway's would (core NATS, with trace context); nothing here decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from typing import Any

from nats.aio.msg import Msg

from snapscale.demo.report import DemoState
from snapscale.shared import bus
from snapscale.shared.bus import (
    CheckpointEvent,
    HostHeartbeat,
    ReplicaEvent,
    TrafficEvent,
    decode_message,
)
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import MessageError

log = logging.getLogger(__name__)
tracer = telemetry.tracer("snapscale.demo")

TRAFFIC_EVERY_S = 0.5
REQUEST_S = 0.5  # how long the demo pretends one request takes


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


class Traffic:
    """Traffic events as a gateway would send them, every half second while `on`."""

    def __init__(self, b: bus.Bus, deployment: str, concurrency: float) -> None:
        self.bus = b
        self.deployment = deployment
        self.concurrency = concurrency
        self.on = False
        self.sent = 0

    async def run(self) -> None:
        subject = self.bus.subjects.traffic(self.deployment)
        while True:
            if self.on:
                # Little's law with a request taking ~0.5 s: `concurrency` requests in flight means
                # about `concurrency` arrivals per half-second interval.
                ev = TrafficEvent(
                    deployment=self.deployment,
                    ts=time.time(),
                    arrivals=max(1, round(self.concurrency * TRAFFIC_EVERY_S / REQUEST_S)),
                    concurrency=self.concurrency,
                )
                # Each event its own trace root: the scaler's decision continues the one that woke it.
                with tracer.start_as_current_span(
                    "traffic", attributes={"snapscale.deployment": self.deployment}
                ):
                    await bus.publish_core(self.bus, subject, ev)
                self.sent += 1
            await asyncio.sleep(TRAFFIC_EVERY_S)


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
