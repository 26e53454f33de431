"""Host ports forwarded to sandboxes in the kernel, so a replica is reachable from other machines.

A sandbox's own address (10.213.x.y, netns.py) is routed on its host only. Each forwarded port is
one element of an nftables map, `host port -> sandbox address . port`, in a table of its own
(`ip <table>`); two DNAT rules consult the map for TCP to any local address of the host:
`prerouting` for packets from other machines, `output` for the host's own. The kernel does the
forwarding (no proxy process in the request path), and the map is the record of what is
forwarded: a restorer that starts again reads it back (`listed`). IPv4 only, like the sandbox pool.

Needs `nft` (Debian's `nftables`) and IPv4 forwarding on (`ensure` turns it on).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.engine.errors import EngineError

log = logging.getLogger(__name__)

MAP = "ports"
_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")  # per network namespace: the caller's


@dataclass(frozen=True)
class Forward:
    """Host port `port` forwarded to `target_ip:target_port` (a sandbox's endpoint)."""

    port: int
    target_ip: str
    target_port: int

    @property
    def target(self) -> str:
        return f"{self.target_ip}:{self.target_port}"


def forward_table_name(namespace: str) -> str:
    """The table of one snapscale namespace (`-` becomes `_`, which nft names may not hold). Pure."""
    name = namespace.replace("-", "_")
    if not _TABLE.fullmatch(name):
        raise EngineError("forward", f"namespace {namespace!r} makes no nftables table name")
    return name


def ruleset(table: str) -> str:
    """The nft script that makes `table` with its map and rules, keeping the map's elements. Pure.

    `add` of what exists is a no-op; the chains are flushed and refilled, so a changed rule
    replaces the old one. One script: nft applies it as one transaction.
    """
    t = f"ip {table}"
    hook = "fib daddr type local dnat ip to tcp dport map @" + MAP
    return "\n".join(
        [
            f"add table {t}",
            f"add map {t} {MAP} {{ type inet_service : ipv4_addr . inet_service; }}",
            f"add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}",
            f"add chain {t} output {{ type nat hook output priority -100; policy accept; }}",
            f"flush chain {t} prerouting",
            f"flush chain {t} output",
            f"add rule {t} prerouting {hook}",
            f"add rule {t} output {hook}",
            "",
        ]
    )


def parse_listing(data: bytes) -> list[Forward]:
    """The forwards in `nft -j list map` output. Pure; raises `EngineError` on what it cannot read."""
    try:
        doc = json.loads(data)
        out = []
        for item in doc["nftables"]:
            m = item.get("map")
            if m is None:
                continue
            for port, value in m.get("elem", []):
                ip, tport = value["concat"]
                out.append(Forward(int(port), str(ipaddress.IPv4Address(ip)), int(tport)))
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError("forward", f"unreadable nft map listing: {e!r}") from None


def port_hint(replica: str, lo: int, hi: int) -> int:
    """The port a replica gets when it is free: spread, so a port just freed is rarely reused. Pure."""
    return lo + zlib.crc32(replica.encode()) % (hi - lo + 1)


def free_host_port(used: set[int], lo: int, hi: int, start: int) -> int:
    """The first port of `lo..hi` not in `used`, from `start` on (wrapping). Pure."""
    n = hi - lo + 1
    for k in range(n):
        p = lo + (start - lo + k) % n
        if p not in used:
            return p
    raise EngineError("forward", f"all {n} forwarded ports {lo}-{hi} are in use")


async def _nft(*args: str, script: str | None = None) -> bytes:
    exe = shutil.which("nft")
    if exe is None:
        raise EngineError("forward", "nft not found: install Debian's nftables (scripts/setup does)")
    proc = await asyncio.create_subprocess_exec(
        exe,
        *args,
        stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(script.encode() if script is not None else None)
    if proc.returncode != 0:
        what = " ".join(args) if script is None else script.strip().replace("\n", "; ")
        raise EngineError("forward", f"nft {what} failed: {err.decode(errors='replace').strip()}")
    return out


def _forwarding_on() -> bool:
    """Turn IPv4 forwarding on in this network namespace; whether it was off."""
    if IP_FORWARD.read_text().strip() == "1":
        return False
    IP_FORWARD.write_text("1\n")
    return True


class PortForwards:
    """The forwards of one table in this network namespace: the nft I/O, nothing allocated here."""

    def __init__(self, table: str) -> None:
        self.table = table

    async def ensure(self) -> None:
        """Make the table, map and rules (keeping forwards already there); turn IPv4 forwarding on."""
        await _nft("-f", "-", script=ruleset(self.table))
        # not in a worker thread: /proc/sys/net is the opening thread's namespace, and a caller may
        # have entered another one on this thread only
        if _forwarding_on():
            log.info("net.ipv4.ip_forward was off: turned on, so forwarded ports reach the sandboxes")

    async def listed(self) -> list[Forward]:
        return parse_listing(await _nft("-j", "list", "map", "ip", self.table, MAP))

    async def add(self, fwd: Forward) -> None:
        elem = f"{{ {fwd.port} : {fwd.target_ip} . {fwd.target_port} }}"
        await _nft("add", "element", "ip", self.table, MAP, elem)

    async def remove(self, port: int) -> None:
        """Stop forwarding `port`; one that is not forwarded is fine."""
        try:
            await _nft("delete", "element", "ip", self.table, MAP, f"{{ {port} }}")
        except EngineError as e:
            if "No such file or directory" not in str(e):
                raise
