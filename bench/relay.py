"""A model of a remote object store per connection for the bench: a loopback HTTP/1.1 relay that
holds each response until a fixed time after its request arrived, then paces its body.

Cheap on CPU so it does not steal the cores it measures: a thread per connection, bodies moved
socket-to-socket with splice(2). No faults here (tests/faultproxy.py has them). Run as a script.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import threading
import time

PIPE_BYTES = 1 << 20
PIECE_BYTES = 256 << 10


def read_head(sock: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
    """An HTTP head (through the blank line) and what followed it, or None at EOF."""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            return None, b""
        buf += more
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head[:-4].split(b"\r\n")[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        out[k.strip().lower()] = v.strip()
    return out


def without(head: bytes, names: tuple[bytes, ...]) -> bytes:
    lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(names)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Relay:
    def __init__(self, upstream_port: int, first_byte_s: float, bytes_per_s: float | None) -> None:
        self.upstream_port = upstream_port
        self.first_byte_s = first_byte_s
        self.bytes_per_s = bytes_per_s

    def serve(self, port: int) -> None:
        srv = socket.create_server(("127.0.0.1", port), backlog=256)
        print(srv.getsockname()[1], flush=True)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, client: socket.socket) -> None:
        # No Nagle: the last partial segment of a paced piece must not wait for a delayed ACK.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up: socket.socket | None = None
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        buf = b""
        try:
            while True:
                head, buf = read_head(client, buf)
                if head is None:
                    return
                t_req = time.monotonic()
                h = headers(head)
                if h.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = without(head, (b"expect:",))
                need = int(h.get("content-length", "0"))
                while len(buf) < need:
                    more = client.recv(max(65536, need - len(buf)))
                    if not more:
                        return
                    buf += more
                body, buf = buf[:need], buf[need:]
                if up is None:
                    up = socket.create_connection(("127.0.0.1", self.upstream_port))
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                up.sendall(head + body)
                rhead, rest = read_head(up, b"")
                if rhead is None:
                    return
                rh = headers(rhead)
                status = int(rhead.split(b" ", 2)[1])
                length = int(rh["content-length"]) if "content-length" in rh else None
                if head.startswith(b"HEAD ") or status in (204, 304):
                    length = 0
                if length is None:  # no length: read to EOF, then say it
                    while more := up.recv(1 << 20):
                        rest += more
                    length = len(rest)
                    up.close()
                    up = None
                # Keep the client's connection alive where the upstream (werkzeug) closes its own.
                out_head = without(rhead, (b"connection:", b"keep-alive:", b"content-length:"))
                out_head = out_head[:-2] + b"Content-Length: %d\r\n\r\n" % length
                wait = t_req + self.first_byte_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                t0 = time.monotonic()
                client.sendall(out_head + rest[:length])
                sent = min(len(rest), length)
                while sent < length:
                    assert up is not None
                    n = os.splice(up.fileno(), w, min(PIECE_BYTES, length - sent))
                    if n == 0:
                        return
                    moved = 0
                    while moved < n:
                        moved += os.splice(r, client.fileno(), n - moved)
                    sent += n
                    if self.bytes_per_s:
                        ahead = sent / self.bytes_per_s - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                if up is not None and rh.get("connection", "").lower() == "close":
                    up.close()
                    up = None
        except OSError:
            return
        finally:
            os.close(r)
            os.close(w)
            if up is not None:
                up.close()
            client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--first-byte-ms", type=float, default=20.0)
    p.add_argument("--mb-per-s", type=float, default=100.0, help="per-connection body bandwidth; 0: none")
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        Relay(a.upstream_port, a.first_byte_ms / 1000, a.mb_per_s * 1e6 or None).serve(a.port)


if __name__ == "__main__":
    main()
