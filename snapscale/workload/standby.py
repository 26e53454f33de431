"""A standby filler: the fd handover's filling process (`handover.serve_filled`) started ahead of any
restore, so its start-up (interpreter, libcuda, cuInit, a context on its GPU: ~0.2-0.3 s) is off
the restore's critical path. It says it is ready (one JSON line), then waits on a Unix socket the
restorer holds the other end of for one job:

    {"record": PATH, "chunks": DIR, "stream": BOOL}\\n   with the workload's listening socket as
                                                         SCM_RIGHTS ancillary data

With "stream", the chunks are still arriving in the host cache: the restorer then writes one
digest a line as each is in and verified, and `all` once every one is (or `stop`: it gave up); the
fill reads each chunk file once it was named (`ChunkGate`). It prints one JSON line with what the
fill took and exits: one job per process, the restorer starts the next standby meanwhile. The
restorer's end closing (it stopped, or died) ends a standby that has no job yet; one mid-job dies
with the restorer (PR_SET_PDEATHSIG); either way it holds `--home` open, so a restarted restorer's
sweep would find it.

    python -m snapscale.workload.standby --gpu GPU-<uuid> --job-fd N [--home DIR] [--threads 8]
        [--timeout-s 120]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from snapscale.workload import fill as filling
from snapscale.workload import handover as ho
from snapscale.workload import record as rec
from snapscale.workload.errors import WeightsError

JOB_MAX = 1 << 16  # bytes of a job line (paths and a flag)
ALL, STOP = "all", "stop"
PR_SET_PDEATHSIG = 1


class ChunkGate:
    """The chunk files a streaming fill may read, as named on `sock` (a digest a line, then `all`
    or `stop`); a reader thread follows the socket. Called with a chunk file's path, it blocks
    until that chunk was named or all were, and raises `WeightsError` when no more will come."""

    def __init__(self, sock: socket.socket, timeout_s: float, already: bytes = b"") -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._named: set[str] = set()
        self._all = False
        self._end: str | None = None  # why no more names will come
        self._reader = threading.Thread(target=self._follow, args=(sock, already), daemon=True)
        self._reader.start()

    def _follow(self, sock: socket.socket, buf: bytes) -> None:
        try:
            while True:
                *lines, buf = buf.split(b"\n")
                if self._take([x.decode(errors="replace").strip() for x in lines]):
                    return
                more = sock.recv(JOB_MAX)
                if not more:
                    return
                buf += more
        except OSError:
            pass
        finally:
            with self._cond:
                if not self._all and self._end is None:
                    self._end = "the restorer closed the job socket before every chunk was in"
                self._cond.notify_all()

    def _take(self, words: list[str]) -> bool:
        """Note the names; True once no more will come."""
        with self._cond:
            for w in words:
                if w == ALL:
                    self._all = True
                elif w == STOP:
                    self._end = "the restorer stopped the fill (the weights' prefetch failed)"
                elif w:
                    self._named.add(w)
            self._cond.notify_all()
            return self._all or self._end is not None

    def __call__(self, path: str) -> None:
        name = os.path.basename(path)
        with self._cond:
            self._cond.wait_for(
                lambda: self._all or name in self._named or self._end is not None, self.timeout_s
            )
            if self._all or name in self._named:
                return
            raise WeightsError("stream", self._end or f"chunk {name[:16]} not in after {self.timeout_s:g} s")


def take_job(sock: socket.socket) -> tuple[dict[str, Any], socket.socket, bytes]:
    """Wait for the job: its fields, the workload's listening socket, and what came after its line
    (the first chunk names of a streaming job)."""
    data, fds, _, _ = socket.recv_fds(sock, JOB_MAX, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise WeightsError("job", "the restorer closed the socket" if not data else f"{len(fds)} fds, want 1")
    listener = socket.socket(fileno=fds[0])
    while b"\n" not in data:
        more = sock.recv(JOB_MAX)
        if not more:
            listener.close()
            raise WeightsError("job", "the restorer closed the socket mid-job")
        data += more
    line, _, rest = data.partition(b"\n")
    try:
        job = json.loads(line)
        if not isinstance(job, dict) or not all(isinstance(job.get(k), str) for k in ("record", "chunks")):
            raise ValueError("want record and chunks as strings")
    except ValueError as e:
        listener.close()
        raise WeightsError("job", f"unreadable: {e}") from None
    return job, listener, rest


def _die_with_parent() -> None:
    """A standby mid-job when the restorer dies goes with it (an idle one sees its socket close)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run(args: argparse.Namespace, lib: Any = None) -> dict[str, Any]:
    """Get ready on the GPU, say so, wait for a job and do it; `lib` stands in for libcuda (tests)."""
    t0 = time.monotonic()
    _die_with_parent()
    # held open for its life: a restarted restorer's sweep finds it by this (procs.pids_holding)
    home = os.open(args.home, os.O_RDONLY | os.O_DIRECTORY) if args.home else -1  # noqa: F841
    sock = socket.socket(fileno=args.job_fd)
    try:
        vmm = ho.HostVmm.open(lib) if lib is not None else ho.HostVmm.load()
        device = vmm.device_of(args.gpu)
        vmm.use_device(device)  # the context: the costly part, done before any job
        print(json.dumps({"standby": os.getpid(), "ready_s": round(time.monotonic() - t0, 4)}), flush=True)
        t_ready = time.monotonic()
        job, listener, rest = take_job(sock)
        with listener:
            waited = time.monotonic() - t_ready
            record = rec.WeightsRecord.from_json(Path(job["record"]).read_bytes(), job["record"])
            gate = ChunkGate(sock, args.timeout_s, rest) if job.get("stream") else None
            out = ho.serve_filled(
                vmm, record, job["chunks"], device, listener,
                threads=args.threads, timeout_s=args.timeout_s, gate=gate,
                on_filled=lambda: print(json.dumps({"filled": record.nbytes}), flush=True),
            )  # fmt: skip
    finally:
        sock.close()
    return {**out, "pid": os.getpid(), "standby_s": round(waited, 4), "streamed": gate is not None}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", required=True, help="the GPU's UUID (GPU-...), as NVML numbers them")
    p.add_argument("--job-fd", type=int, required=True, help="a connected Unix stream socket, inherited")
    p.add_argument("--home", default="", help="a directory held open while it runs (the restorer's sweep)")
    p.add_argument("--threads", type=int, default=filling.DEFAULT_THREADS)
    p.add_argument("--timeout-s", type=float, default=120.0, help="for chunks to arrive, and to hand over")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, lib: Any = None) -> int:
    return ho.outcome(lambda: run(parse(argv), lib))


if __name__ == "__main__":
    sys.exit(main())
