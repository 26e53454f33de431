"""This host's forwarded ports: a host port per replica, so other machines reach it at
`<advertise_addr>:<port>` (SNAPSCALE_ADVERTISE_ADDR); without an advertise address, none.

The port is allocated from `forward_ports` when a sandbox has its endpoint, written into its
registry record (`Sandbox.host_port`) and forwarded by the kernel (engine forward.py); it is
removed when the sandbox stops. Crash-safe without a ledger of its own: at start `reconcile`
keeps the forwards the kernel still holds for the sandboxes re-adopted (the registry says which
port is whose), forwards again those it lost, and removes every other one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from snapscale.restorer.config import RestorerConfig
from snapscale.shared.engine import (
    Forward,
    PortForwards,
    Sandbox,
    forward_table_name,
    free_host_port,
    port_hint,
)

log = logging.getLogger(__name__)


def target_of(sb: Sandbox) -> tuple[str, int]:
    ip, _, port = sb.endpoint.rpartition(":")
    return ip, int(port)


class Forwards:
    """The forwards of one restorer. Ports are taken under a lock: scale-ups run concurrently."""

    def __init__(self, config: RestorerConfig, namespace: str) -> None:
        self.advertise_addr = config.advertise_addr
        self.lo, self.hi = config.forward_ports
        self.kernel = PortForwards(forward_table_name(namespace))
        self.ports: dict[int, str] = {}  # host port -> replica
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.advertise_addr is not None

    def endpoint(self, sb: Sandbox) -> str:
        """Where others send requests: the advertised port, or the sandbox itself when not forwarded."""
        if self.advertise_addr is None or sb.host_port is None:
            return sb.endpoint
        return f"{self.advertise_addr}:{sb.host_port}"

    async def reconcile(self, adopted: list[Sandbox]) -> list[Sandbox]:
        """At start: make the table, keep or restore the adopted sandboxes' forwards, drop the rest.

        Returns `adopted` with `host_port` as now forwarded (the caller re-records those changed).
        """
        if not self.enabled:
            return adopted
        await self.kernel.ensure()
        found = {f.port: f for f in await self.kernel.listed()}
        lost = []
        for sb in adopted:
            f = found.get(sb.host_port) if sb.host_port is not None else None
            if f is not None and (f.target_ip, f.target_port) == target_of(sb):
                self.ports[f.port] = sb.replica
            else:
                lost.append(sb.replica)
        for port, f in found.items():
            if port not in self.ports:
                log.info("forward %d -> %s: no sandbox here serves it any more; removed", port, f.target)
                await self.kernel.remove(port)
        return [await self.open(replace(sb, host_port=None)) if sb.replica in lost else sb for sb in adopted]

    async def open(self, sb: Sandbox) -> Sandbox:
        """Forward a free host port to `sb`; `sb` with it (as it was, when forwarding is off).

        A sandbox that has its port (a resumed one, maybe under a new replica id) keeps it, now
        under its current id, so closing that id removes it."""
        if not self.enabled:
            return sb
        if sb.host_port is not None:
            self.ports[sb.host_port] = sb.replica
            return sb
        ip, tport = target_of(sb)
        async with self._lock:
            start = port_hint(sb.replica, self.lo, self.hi)
            port = free_host_port(set(self.ports), self.lo, self.hi, start)
            await self.kernel.add(Forward(port, ip, tport))
            self.ports[port] = sb.replica
        log.info("replica %s: host port %d forwarded to %s", sb.replica, port, sb.endpoint)
        return replace(sb, host_port=port)

    async def close(self, replica: str) -> None:
        """Stop forwarding the ports of `replica` (by name: a scale-up cut short between the forward
        and its record leaves no port behind). Idempotent."""
        async with self._lock:
            for port in [p for p, r in self.ports.items() if r == replica]:
                await self.kernel.remove(port)
                del self.ports[port]
