"""The fidelity matrix's workload: one process tree holding one of each thing a model server holds,
checking each on `GET /report` (JSON, one entry per row). Standard library only; run as a sandbox.

Environment: FIDELITY_DIR (a directory for its files), FIDELITY_EXT_PORT (a TCP echo server on the
sandbox's gateway, outside the sandbox), FIDELITY_MARK (echoed back: the environment row),
FIDELITY_SHM (the POSIX shared memory's path in /dev/shm).
`GET /report?note=<text>` appends `<text>` to its log first (the appended-file row).
`--external-unix PATH` connects to a UNIX socket outside the sandbox and holds it (a freeze refuses).
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DIR = os.environ.get("FIDELITY_DIR", "/tmp")
# The child maps the POSIX shared memory itself; asked "shm", it answers what its mapping holds.
CHILD = """
import mmap, os, sys
m = mmap.mmap(os.open(sys.argv[1], os.O_RDWR), 4096)
for line in sys.stdin:
    sys.stdout.write(m[:10].decode() + "\\n" if line == "shm\\n" else line.upper())
    sys.stdout.flush()
"""


def echo_forever(conn: socket.socket) -> None:
    try:
        while data := conn.recv(4096):
            conn.sendall(data)
    except OSError:
        pass


def roundtrip(s: socket.socket, msg: bytes) -> bool:
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        part = s.recv(len(msg) - len(got))
        if not part:
            return False
        got += part
    return got == msg


class Rows:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # one report at a time: the rows share their sockets
        self.ticks = 0
        self.signals = 0
        self.accepted = 0  # TCP connections accepted (before any accepting thread starts)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        self.worker = threading.Thread(target=self._tick, daemon=True)
        self.worker.start()
        # a child process on pipes, sharing the POSIX shared memory
        # (shm_open is a file in /dev/shm; multiprocessing's SharedMemory would start a tracker)
        self.shm_path = os.environ.get("FIDELITY_SHM", f"/dev/shm/fidelity-{os.getpid()}-{time.time_ns()}")
        shm_fd = os.open(self.shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(shm_fd, 4096)
        self.shm = mmap.mmap(shm_fd, 4096, mmap.MAP_SHARED)
        os.close(shm_fd)
        self.shm[:5] = b"hello"
        self.reports = 0
        self.child = subprocess.Popen(
            [sys.executable, "-c", CHILD, self.shm_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # UNIX: a socketpair between threads, and a connection to an abstract listener
        self.pair, far = socket.socketpair()
        threading.Thread(target=echo_forever, args=(far,), daemon=True).start()
        self.ulisten = socket.socket(socket.AF_UNIX)
        self.ulisten.bind(f"\0fidelity-{os.getpid()}-{time.time_ns()}")
        self.ulisten.listen()
        threading.Thread(target=self._accept, args=(self.ulisten,), daemon=True).start()
        self.uconn = socket.socket(socket.AF_UNIX)
        self.uconn.connect(self.ulisten.getsockname())
        # loopback TCP between two threads
        self.tlisten = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(self.tlisten,), daemon=True).start()
        self.tconn = socket.create_connection(self.tlisten.getsockname())
        # TCP to a server outside the sandbox: a pinger that reconnects
        self.ext_events: list[str] = []
        self.ext_pings = 0
        self.ext_local = ""
        if os.environ.get("FIDELITY_EXT_PORT"):
            threading.Thread(target=self._ext, daemon=True).start()
        # files: a shared mapping, an unlinked file, an append-only log
        self.mapped_path = os.path.join(DIR, "mapped.bin")
        with open(self.mapped_path, "wb") as f:
            f.write(b"\0" * 4096)
        self.mapped_fd = os.open(self.mapped_path, os.O_RDWR)
        self.mapped = mmap.mmap(self.mapped_fd, 4096, mmap.MAP_SHARED)
        self.mapped[:6] = b"mapped"
        ghost = os.path.join(DIR, "ghost.bin")
        self.ghost_fd = os.open(ghost, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(self.ghost_fd, hashlib.sha256(b"ghost").digest() * 2048)
        os.unlink(ghost)
        self.log_fd = os.open(os.path.join(DIR, "app.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self.log_fd, b"started\n")

    def _on_usr1(self, _sig: int, _frame: object) -> None:
        self.signals += 1

    def _tick(self) -> None:
        while True:
            self.ticks += 1
            time.sleep(0.01)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            self.accepted += listener.family == socket.AF_INET
            threading.Thread(target=echo_forever, args=(conn,), daemon=True).start()

    def _ext(self) -> None:
        port = int(os.environ["FIDELITY_EXT_PORT"])
        while True:
            try:
                s = socket.create_connection((gateway(), port), timeout=5)
            except OSError as e:
                self.ext_events.append(f"connect failed: {e.strerror}")
                time.sleep(0.1)
                continue
            self.ext_local = "{}:{}".format(*s.getsockname()[:2])
            self.ext_events.append("connected")
            try:
                while True:
                    if not roundtrip(s, b"ping\n"):
                        self.ext_events.append("eof")
                        break
                    self.ext_pings += 1
                    time.sleep(0.02)
            except OSError as e:
                self.ext_events.append(f"error: {e.strerror}")
            s.close()

    def report(self, note: str) -> dict[str, Any]:
        with self.lock:
            if note:
                os.write(self.log_fd, f"{note}\n".encode())
            handled = self.signals
            os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler in the main thread, soon
            deadline = time.monotonic() + 5
            while self.signals == handled and time.monotonic() < deadline:
                time.sleep(0.001)
            assert self.child.stdin is not None and self.child.stdout is not None
            self.child.stdin.write("ping\n")
            self.child.stdin.flush()
            child_echo = self.child.stdout.readline()
            self.reports += 1
            self.shm[5:10] = f"{self.reports:05d}".encode()  # the child reads its own mapping
            self.child.stdin.write("shm\n")
            self.child.stdin.flush()
            shm_seen = self.child.stdout.readline().strip()
            fresh = socket.create_connection(self.tlisten.getsockname())
            fresh_ok = roundtrip(fresh, b"new")
            fresh.close()
            unew = socket.socket(socket.AF_UNIX)
            unew.connect(self.ulisten.getsockname())
            unew_ok = roundtrip(unew, b"new")
            unew.close()
            self.mapped[6:12] = b"-again"
            return {
                "threads": {
                    "alive": self.worker.is_alive(),
                    "ticks": self.ticks,
                    "tid": self.worker.native_id,
                },
                "child_pipes": {"pid": self.child.pid, "echo": child_echo.strip()},
                "unix": {
                    "pair": roundtrip(self.pair, b"pair"),
                    "stream": roundtrip(self.uconn, b"s"),
                    "new_conn": unew_ok,
                },
                "tcp_loopback": {
                    "same_conn": roundtrip(self.tconn, b"tcp"),
                    "accepted": self.accepted,
                    "new_conn": fresh_ok,
                },
                "tcp_external": {
                    "events": list(self.ext_events),
                    "pings": self.ext_pings,
                    "local": self.ext_local,
                },
                "posix_shm": {"path": self.shm_path, "seen_by_child": shm_seen, "report": self.reports},
                "shared_mapping": {
                    "mapping": bytes(self.mapped[:12]).decode(),
                    "file": os.pread(self.mapped_fd, 12, 0).decode(),
                },
                "unlinked_file": {
                    "sha256": hashlib.sha256(os.pread(self.ghost_fd, 1 << 20, 0)).hexdigest(),
                    "links": os.fstat(self.ghost_fd).st_nlink,
                },
                "appended_file": {"offset": os.lseek(self.log_fd, 0, os.SEEK_CUR)},
                "signals": {
                    "handled": self.signals,
                    "handler": signal.getsignal(signal.SIGUSR1) == self._on_usr1,
                },
                "clock": {
                    "monotonic": time.monotonic(),
                    "wall": time.time(),
                    "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
                },
                "env_cwd": {
                    "mark": os.environ.get("FIDELITY_MARK", ""),
                    "cwd": os.getcwd(),
                    "pid": os.getpid(),
                },
            }


def gateway() -> str:
    """The sandbox's default gateway (the host end of its veth): read at each connect, since a
    restored sandbox sits in another subnet."""
    with open("/proc/net/route") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
    raise OSError("no default route")


def serve(port: int, routes: dict[str, Callable[[dict[str, str]], bytes]]) -> None:
    """HTTP on `port`: `/healthz`, and each route's answer to its query parameters (the GPU
    workload, gpu_workload.py, serves its own routes with it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            route = routes.get(url.path)
            if url.path == "/healthz":
                body = b"ok"
            elif route is not None:
                body = route({k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()})
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a: object) -> None:
            pass

    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


def main() -> None:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a stuck report: the test asks for stacks
    args = sys.argv[1:]
    if args[:1] == ["--external-unix"]:
        held = socket.socket(socket.AF_UNIX)
        held.connect(args[1])
        serve(8000, {})
    rows = Rows()
    serve(8000, {"/report": lambda q: json.dumps(rows.report(q.get("note", ""))).encode()})


if __name__ == "__main__":
    main()
