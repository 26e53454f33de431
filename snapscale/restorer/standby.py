"""Standby fillers: with SNAPSCALE_WEIGHTS_FILL=host on a host with GPUs, one filling process per
GPU (`python -m snapscale.workload.standby`) started ahead and waiting with its CUDA context made,
so a restore or resume hands it its job at once instead of starting one (~0.2-0.3 s: interpreter,
cuInit, context). A standby that takes a job is replaced in the background; one found dead is
replaced too (that job then waits for the fresh one's start, as without standbys). Each costs one
CUDA context on its GPU (~0.5 GiB of GPU memory); SNAPSCALE_FILL_STANDBY=0 turns them off.

A standby ends by itself when the restorer's end of its job socket closes (the restorer stopped or
died): nothing of it outlives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapscale.shared.store import HostCache
from snapscale.workload.standby import ALL, STOP

log = logging.getLogger(__name__)

COMMAND = (sys.executable, "-m", "snapscale.workload.standby")
FILLERS_DIR = "fillers"  # under the restorer's work dir: every filler holds it open


@dataclass(eq=False)  # by identity: kept in a set
class Filler:
    """One filling process, the restorer's end of its job socket, and what it printed (a line
    when ready, one when its fill is done, one at the end), read as it comes."""

    gpu: str
    proc: asyncio.subprocess.Process
    sock: socket.socket
    lines: list[bytes] = field(default_factory=list)
    filled: asyncio.Event = field(default_factory=asyncio.Event)  # fill done, failed, or exited
    _watch: asyncio.Task[None] | None = None

    def watch(self) -> None:
        self._watch = asyncio.create_task(self._follow(), name=f"filler {self.proc.pid}")

    async def _follow(self) -> None:
        assert self.proc.stdout is not None
        try:
            async for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith((b'{"filled"', b'{"error"')):
                    self.filled.set()
        finally:
            self.filled.set()

    async def ended(self) -> None:
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def hand(self, record: Path, chunks: Path, listener: socket.socket, stream: bool) -> None:
        """Give it its job, the workload's listening socket with it (SCM_RIGHTS)."""
        line = json.dumps({"record": str(record), "chunks": str(chunks), "stream": stream}).encode() + b"\n"
        self.sock.setblocking(True)  # one short line into an empty socket buffer: no wait
        try:
            socket.send_fds(self.sock, [line], [listener.fileno()])
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()


class Fillers:
    """Filling processes by GPU: standbys kept ready when `standby`, else started per job."""

    def __init__(
        self, gpus: Iterable[str], *, standby: bool, home: Path | None = None,
        command: Sequence[str] = COMMAND,
    ) -> None:  # fmt: skip
        self.gpus = list(gpus)
        self.standby = standby
        self.home = home  # each filler holds it open: a restart's sweep finds what a crash left
        self.command = tuple(command)
        self._closing = False
        self._ready: dict[str, Filler] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._all: set[Filler] = set()

    async def start(self) -> None:
        """Start a standby per GPU (when asked for); returns once they are spawned, not ready."""
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True)
        if self.standby:
            await asyncio.gather(*(self._replace(g) for g in self.gpus))

    async def take(self, gpu: str) -> Filler:
        """A filler for a job on `gpu`: its standby if alive, else one started now. A fresh standby
        follows in the background once this one has ended: not while its fill and the restore
        it serves use the card and the cores."""
        f = self._ready.pop(gpu, None)
        if f is not None and not f.alive:
            log.warning("standby filler %d for %s had exited (%s): starting one now", f.proc.pid, gpu,
                        f.proc.returncode)  # fmt: skip
            await self._reap(f)
            f = None
        f = f if f is not None else await self._spawn(gpu)
        if self.standby:
            self._background(self._after(f), f"standby filler {gpu}")
        return f

    async def _after(self, f: Filler) -> None:
        await f.ended()
        if not self._closing:
            await self._replace(f.gpu)

    def later(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background, cancelled by `close` (a filler's exit after its job)."""
        self._background(work, name)

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        t = asyncio.create_task(work, name=name)
        self._starting.add(t)
        t.add_done_callback(self._starting.discard)

    def waiting(self, gpu: str) -> Filler | None:
        """`gpu`'s standby, if one is started and alive."""
        f = self._ready.get(gpu)
        return f if f is not None and f.alive else None

    async def _replace(self, gpu: str) -> None:
        try:
            f = await self._spawn(gpu)
        except OSError as e:
            log.warning("cannot start a standby filler for %s: %s", gpu, e)
            return
        old = self._ready.get(gpu)
        if self._closing or (old is not None and old.alive):  # one raced us in: keep it, stop ours
            await self.finish(f, 0.0)
        else:
            self._ready[gpu] = f
            self._background(self._mind(f), f"mind standby {f.proc.pid}")

    async def _mind(self, f: Filler) -> None:
        """Replace `f` if it dies while waiting, once it had been ready (one that never got ready
        is not restarted here, so a filler that cannot start does not loop: the next job starts
        one itself)."""
        await f.ended()
        if self._ready.get(f.gpu) is not f or self._closing:
            return  # it took a job, or we are stopping
        del self._ready[f.gpu]
        self._all.discard(f)
        f.close()
        said = b"".join(f.lines).decode(errors="replace").strip()[-500:]
        log.warning("standby filler %d for %s exited %s while waiting: %s", f.proc.pid, f.gpu,
                    f.proc.returncode, said)  # fmt: skip
        if f.lines and f.lines[0].startswith(b'{"standby"'):
            await self._replace(f.gpu)

    async def _spawn(self, gpu: str) -> Filler:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The restorer's own environment: every GPU of the host visible, as NVML numbers them.
            home = ("--home", str(self.home)) if self.home is not None else ()
            proc = await asyncio.create_subprocess_exec(
                *self.command, "--gpu", gpu, "--job-fd", str(theirs.fileno()), *home,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        f = Filler(gpu, proc, ours)
        f.watch()
        self._all.add(f)
        return f

    async def finish(self, f: Filler, wait_s: float) -> tuple[bytes, int | None]:
        """Wait up to `wait_s` for `f` to end (killed after), closing our end: what it printed and
        its exit status (None: it was killed)."""
        f.close()
        try:
            await asyncio.wait_for(f.ended(), max(wait_s, 0.001))
            return b"".join(f.lines), f.proc.returncode
        except TimeoutError:
            await self._reap(f)
            return b"".join(f.lines), None
        except asyncio.CancelledError:  # `close` stops its background settles: the filler with them
            await self._reap(f)
            raise
        finally:
            self._all.discard(f)

    async def _reap(self, f: Filler) -> None:
        f.close()
        with contextlib.suppress(ProcessLookupError):
            f.proc.kill()
        await f.ended()
        self._all.discard(f)

    async def close(self) -> None:
        """Stop every standby (and any filler still running)."""
        self._closing = True
        for t in list(self._starting):
            t.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        self._ready.clear()
        await asyncio.gather(*(self._reap(f) for f in list(self._all)))


def _noted(note: Callable[[str], None], d: str, _f: object) -> None:
    note(d)


async def announce(f: Filler, cache: HostCache, digests: Iterable[str], ready: asyncio.Future[Any]) -> None:
    """A streaming job's names: each of `digests` as it is in `cache` and verified, then `all` once
    `ready` (the weights' prefetch) is done, or `stop` if it failed."""
    arrived: list[str] = []
    wake = asyncio.Event()

    def note(d: str) -> None:
        arrived.append(d)
        wake.set()

    for d in set(digests):
        cache.arrival(d).add_done_callback(functools.partial(_noted, note, d))
    ready.add_done_callback(lambda _f: wake.set())
    try:
        while True:
            await wake.wait()
            wake.clear()
            batch, arrived[:] = arrived[:], []
            if batch:
                await f.send(("\n".join(batch) + "\n").encode())
            if ready.done():
                ok = not ready.cancelled() and ready.exception() is None
                await f.send(f"{ALL if ok else STOP}\n".encode())
                return
    except OSError:
        return  # the filler is gone: the workload fills from the chunk files
