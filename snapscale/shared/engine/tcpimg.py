"""Established TCP connections in a CRIU image: loopback ones come back working, the others closed.

CRIU dumps every established connection with `--tcp-established` (TCP repair: sequence numbers and
queues) and restores each the same way. A restore gets a fresh netns whose address differs from the
frozen one (netns.py): a connection bound to the old address cannot be bound back (EADDRNOTAVAIL,
the whole restore fails), and its peer outside may still be talking to the frozen sandbox, which
kept running. CRIU's `--tcp-close` closes every connection, the loopback ones too.

So after a dump, each connection whose two ends are not both on loopback is rewritten in
`files.img` as a TCP socket that was never connected and was shut down both ways: CRIU makes a
fresh socket and calls shutdown() on it, which the kernel records even on an unconnected socket
(and CRIU accepts its ENOTCONN for a closed one). The workload's next read returns 0 (EOF), a write
fails with EPIPE, poll and epoll report it readable and hung up: a blocked reader wakes and
reconnects. Nothing goes to the peer: no RST from an address the sandbox no longer has, into a
connection the still-running original may own. A connection between two sandbox processes over
the sandbox's own address is not on loopback and is closed too (both ends see EOF).
Pure parsing and planning, plus one function that rewrites the file.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.engine import protowire as pw
from snapscale.shared.engine.pages import IMG_COMMON_MAGIC, CriuImageError, read_messages

FILES_MAGIC = 0x56303138
FD_INETSK = 4  # file_entry.type
_IPPROTO_TCP = 6
_AF_INET, _AF_INET6 = 2, 10
_TCP_CLOSE = 7
_SHUTDOWN_BOTH = 3
# inet_sk_entry's fields
_FAMILY, _PROTO, _STATE, _SRC_PORT, _DST_PORT, _SRC_ADDR, _DST_ADDR, _SHUTDOWN = 3, 5, 6, 7, 8, 11, 12, 19


@dataclass(frozen=True)
class Connection:
    """One established TCP connection of the image, as `addr:port` text."""

    local: str
    peer: str
    loopback: bool


def _addr(family: int, words: list[int]) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """CRIU keeps an address as the u32 words of its network-order bytes."""
    raw = b"".join(struct.pack("<I", w) for w in words)
    if family == _AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    a6 = ipaddress.IPv6Address(raw[:16])
    return a6.ipv4_mapped or a6


def connection_of(isk: bytes) -> Connection | None:
    """The established TCP connection an `inet_sk_entry` holds, or None (listening, UDP...). Pure."""
    ints: dict[int, int] = {}
    src: list[int] = []
    dst: list[int] = []
    for num, v in pw.fields(isk):
        if isinstance(v, int):
            if num == _SRC_ADDR:
                src.append(v)
            elif num == _DST_ADDR:
                dst.append(v)
            else:
                ints[num] = v
    if ints.get(_PROTO) != _IPPROTO_TCP or not ints.get(_DST_PORT):
        return None  # CRIU's own test for a connection (sk-inet.c tcp_connection)
    family = ints.get(_FAMILY, _AF_INET)
    need = 1 if family == _AF_INET else 4
    if len(src) < need or len(dst) < need:
        raise ValueError(f"inet socket with {len(src)}/{len(dst)} address words, family {family}")
    a, b = _addr(family, src), _addr(family, dst)
    return Connection(
        f"{a}:{ints.get(_SRC_PORT, 0)}", f"{b}:{ints[_DST_PORT]}", a.is_loopback and b.is_loopback
    )


def closed(isk: bytes) -> bytes:
    """The `inet_sk_entry` as a socket never connected, shut down both ways, bound nowhere. Pure."""
    out = [raw for num, _v, raw in pw.raw_fields(isk) if num not in (_STATE, _SRC_PORT, _DST_PORT, _SHUTDOWN)]
    out.append(
        pw.encode_fields([(_STATE, _TCP_CLOSE), (_SRC_PORT, 0), (_DST_PORT, 0), (_SHUTDOWN, _SHUTDOWN_BOTH)])
    )
    return b"".join(out)


def rewrite_entry(entry: bytes) -> tuple[bytes, Connection | None]:
    """A `file_entry` with its external TCP connection closed; the connection it held. Pure."""
    kind = next((v for num, v in pw.fields(entry) if num == 1), None)
    if kind != FD_INETSK:
        return entry, None
    parts: list[bytes] = []
    conn: Connection | None = None
    for num, v, raw in pw.raw_fields(entry):
        if num == FD_INETSK and isinstance(v, bytes):
            conn = connection_of(v)
            if conn is not None and not conn.loopback:
                raw = pw.encode_bytes_field(FD_INETSK, closed(v))
        parts.append(raw)
    return b"".join(parts), conn


def close_external(image_dir: Path) -> list[Connection]:
    """Close the image's TCP connections that leave the sandbox (rewrites `files.img` in place,
    atomically); every established connection found, with whether it stays. An image without
    connections is left untouched."""
    path = image_dir / "files.img"
    if not path.exists():
        return []
    header, msgs = read_messages(path, FILES_MAGIC)
    if header[:4] != struct.pack("<I", IMG_COMMON_MAGIC):
        raise CriuImageError(path.name, "not a CRIU image")
    found: list[Connection] = []
    out: list[bytes] = []
    try:
        for m in msgs:
            new, conn = rewrite_entry(m)
            if conn is not None:
                found.append(conn)
            out.append(struct.pack("<I", len(new)) + new)
    except ValueError as e:
        raise CriuImageError(path.name, str(e)) from None
    if any(not c.loopback for c in found):
        tmp = path.with_name(".files.img.tmp")
        tmp.write_bytes(header + b"".join(out))
        os.replace(tmp, path)
    return found
