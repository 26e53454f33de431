"""tcpimg: which TCP connections of a CRIU image come back working, and the rewrite of the others.
The real restore of both kinds is in tests/fidelity (the fidelity matrix)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from snapscale.shared.engine import protowire as pw
from snapscale.shared.engine import tcpimg
from snapscale.shared.engine.pages import IMG_COMMON_MAGIC, CriuImageError


def _words(ip: bytes) -> list[int]:
    """An address as CRIU keeps it: u32 words of its network-order bytes."""
    return [struct.unpack_from("<I", ip, i)[0] for i in range(0, len(ip), 4)]


def isk(src: bytes, dst: bytes, *, dst_port: int = 8080, proto: int = 6, family: int = 2) -> bytes:
    body = pw.encode_fields([(1, 9), (2, 77), (3, family), (4, 1), (5, proto), (6, 1), (7, 40000)])
    body += pw.encode_fields([(8, dst_port), (9, 2), (10, 0)])
    body += pw.encode_fields([(11, v) for v in _words(src)] + [(12, v) for v in _words(dst)])
    body += pw.encode_bytes_field(14, pw.encode_fields([(1, 1)]))  # opts: kept byte for byte
    return body


def entry(body: bytes, kind: int = tcpimg.FD_INETSK) -> bytes:
    return pw.encode_fields([(1, kind), (2, 9)]) + pw.encode_bytes_field(kind, body)


LO = bytes([127, 0, 0, 1])
EXT = bytes([10, 213, 0, 2])
V6_LO = bytes(15) + b"\x01"


def test_loopback_connections_stay_and_others_are_external() -> None:
    assert tcpimg.connection_of(isk(LO, LO)) == tcpimg.Connection("127.0.0.1:40000", "127.0.0.1:8080", True)
    c = tcpimg.connection_of(isk(LO, EXT))
    assert c is not None and not c.loopback and c.peer == "10.213.0.2:8080"
    assert tcpimg.connection_of(isk(V6_LO, V6_LO, family=10)) is not None
    assert tcpimg.connection_of(isk(V6_LO, V6_LO, family=10)).loopback  # type: ignore[union-attr]


def test_listening_and_udp_sockets_are_no_connections() -> None:
    assert tcpimg.connection_of(isk(EXT, bytes(4), dst_port=0)) is None
    assert tcpimg.connection_of(isk(LO, EXT, proto=17)) is None


def test_an_external_connection_becomes_a_socket_shut_down_both_ways() -> None:
    new, conn = tcpimg.rewrite_entry(entry(isk(EXT, EXT)))
    assert conn is not None and not conn.loopback
    sub = next(v for n, v in pw.fields(new) if n == tcpimg.FD_INETSK)
    assert isinstance(sub, bytes)
    f = dict((n, v) for n, v in pw.fields(sub) if n not in (11, 12))
    assert (f[6], f[7], f[8], f[19]) == (7, 0, 0, 3)  # TCP_CLOSE, unbound, unconnected, SHUT_RDWR
    assert f[14] == pw.encode_fields([(1, 1)]) and f[2] == 77
    assert tcpimg.connection_of(sub) is None  # CRIU no longer sees a connection to repair


def test_loopback_and_other_entries_are_left_byte_for_byte() -> None:
    for e in (entry(isk(LO, LO)), entry(b"\x08\x01", kind=2)):
        assert tcpimg.rewrite_entry(e)[0] == e


def _image(path: Path, entries: list[bytes]) -> None:
    head = struct.pack("<II", IMG_COMMON_MAGIC, tcpimg.FILES_MAGIC)
    path.write_bytes(head + b"".join(struct.pack("<I", len(e)) + e for e in entries))


def test_close_external_rewrites_files_img(tmp_path: Path) -> None:
    keep, ext = entry(isk(LO, LO)), entry(isk(EXT, LO))
    _image(tmp_path / "files.img", [keep, ext])
    found = tcpimg.close_external(tmp_path)
    assert [c.loopback for c in found] == [True, False]
    assert [c.loopback for c in tcpimg.close_external(tmp_path)] == [True]  # the other one is gone
    data = (tmp_path / "files.img").read_bytes()
    assert keep in data and ext not in data


def test_a_cut_image_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "files.img", [entry(isk(LO, EXT))[:-3]])
    with pytest.raises(CriuImageError):
        tcpimg.close_external(tmp_path)
    assert tcpimg.close_external(tmp_path / "nothing") == []
