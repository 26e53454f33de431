"""Where a restored or resumed workload's weights come from. The host cache's chunk files, or with
SNAPSCALE_WEIGHTS_FILL=host a filling process (the GPU's standby, restorer/standby.py) given its
job as the CRIU restore or the CUDA resume starts fills new GPU memory with them from the host
cache meanwhile (on a cold restore each chunk as soon as it is in), and hands it to the workload as
an fd in after_restore, so the fill is off the critical path (docs/weights.md). The engine waits
for the fill before after_restore: its `weights_wait` phase shows what the filler still took.

The restorer binds the Unix socket in the replica's run dir and passes it to the filler, so the
workload can connect whenever after_restore runs; the fd goes out once the fill is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapscale.restorer.standby import Filler, Fillers, announce
from snapscale.shared.engine import ChunkDir, EngineError, Sandbox, read_weights, suspended_weights
from snapscale.shared.store import HostCache
from snapscale.workload import FdHandover, FillSource, WeightsRecord
from snapscale.workload.record import IMAGE_FILE
from snapscale.workload.vmm import CudaArena

log = logging.getLogger(__name__)

SOCKET_NAME = "weights.sock"
SUN_PATH_MAX = 108  # sockaddr_un.sun_path, with its terminating NUL
WAIT_S = 10.0  # for the filler to finish once after_restore returned


def target_gpu(record: WeightsRecord, gpu_uuids: list[str]) -> str:
    """The card the workload's arena is on after the restore: its device ordinal (as the workload
    saw it at boot) indexes the replica's GPUs, remapped by the CUDA restore in that order. Pure."""
    kind, _, index = record.arena.device.partition(":")
    if kind != "cuda" or not index.isdigit() or int(index) >= len(gpu_uuids):
        raise EngineError(
            "restore", f"weights arena on {record.arena.device!r}; this replica has {len(gpu_uuids)} GPUs"
        )
    return gpu_uuids[int(index)]


@dataclass(frozen=True)
class Fill:
    """What a restore hands the engine for its weights: the source, and what to wait for before
    after_restore (the weights' prefetch, and a filler's fill), None when nothing."""

    source: FillSource
    ready: Awaitable[object] | None = None


@contextlib.asynccontextmanager
async def weights_source(
    fill: str, image_dir: Path, cache: HostCache, gpu_uuids: list[str], run_dir: Path,
    fillers: Fillers | None, prefetch: asyncio.Future[Any] | None = None,
) -> AsyncIterator[Fill]:  # fmt: skip
    """Where a restore's workload gets its weights, for the restore: the host cache's chunk files,
    or with `fill` "host" on a GPU replica, memory a filler fills meanwhile, streaming each chunk
    as it is in while `prefetch`, the weights' prefetch, runs."""
    chunks = cache.chunks_dir
    if fill != "host" or not gpu_uuids or fillers is None:
        yield Fill(ChunkDir(str(chunks)), prefetch)
        return
    record = read_weights(image_dir)
    if record is None:
        raise EngineError("restore", f"{image_dir} has no weights record to fill from")
    if record.arena.kind != CudaArena.kind:  # weights in host memory: the workload fills them
        yield Fill(ChunkDir(str(chunks)), prefetch)
        return
    gpu = target_gpu(record, gpu_uuids)
    job = Job(record, image_dir / IMAGE_FILE, chunks, gpu, run_dir, cache, prefetch)
    async with host_fill(job, fillers) as source:
        yield source


@contextlib.asynccontextmanager
async def resume_source(
    cache: HostCache, fill: str, sb: Sandbox, gpu_uuids: list[str], fillers: Fillers | None
) -> AsyncIterator[Fill | None]:
    """Where a resumed sandbox's released weights come from, for the resume: the host cache's chunk
    files when this process has hashed every one (a replica restored from a checkpoint with
    weights), pinned meanwhile; with `fill` "host" on GPUs, memory a filler fills beside the CUDA
    resume. Else None: the workload's own files, verified."""
    record = suspended_weights(sb)
    need = set(record.chunk_sizes()) if record is not None else set()
    with cache.pinned(need):  # nothing evicts them while they are read
        if record is None or not need or not all(cache.verified(d) for d in need):
            yield None
        elif fill == "host" and gpu_uuids and record.arena.kind == CudaArena.kind and fillers is not None:
            gpu, run_dir = target_gpu(record, gpu_uuids), Path(sb.run_dir)
            job = Job(record, run_dir / IMAGE_FILE, cache.chunks_dir, gpu, run_dir)
            async with host_fill(job, fillers) as source:
                yield source
        else:
            yield Fill(ChunkDir(str(cache.chunks_dir)))


@dataclass(frozen=True)
class Job:
    """One filler's work: `record`'s weights onto `gpu` from the chunk files in `chunks`; with
    `cache` (whose chunks they are) and `prefetch` (still fetching them), each chunk streamed as it
    is in."""

    record: WeightsRecord
    record_path: Path
    chunks: Path
    gpu: str
    run_dir: Path
    cache: HostCache | None = None
    prefetch: asyncio.Future[Any] | None = None  # a Task: awaited by the fill and the names


@contextlib.asynccontextmanager
async def host_fill(job: Job, fillers: Fillers) -> AsyncIterator[Fill]:
    """A filler (the GPU's standby when there is one) filling `job`, for the block: the source to
    give the engine, and what to wait for before after_restore (the prefetch, then the fill). A
    filler still running after the block is stopped; what it said is logged (its fill time, or why
    it failed: the workload then fills from the chunk files itself)."""
    chunks, stream = job.chunks, job.cache is not None and job.prefetch is not None
    try:
        f: Filler | None = await fillers.take(job.gpu)
    except OSError as e:  # no filler to be had: the workload fills from the chunk files
        log.warning("no weights filler for %s: %s", job.run_dir.name, e)
        f = None
    if f is None:
        yield Fill(ChunkDir(str(chunks)), job.prefetch)
        return
    path = socket_path(job.run_dir)
    names: asyncio.Task[None] | None = None
    try:
        listener = _listen(path)
        try:
            f.hand(job.record_path, chunks, listener, stream)
        except OSError as e:  # it died meanwhile: the workload's connect is refused, it fills itself
            log.warning("weights filler %d for %s took no job: %s", f.proc.pid, job.run_dir.name, e)
        finally:
            listener.close()  # the filler holds its copy; the workload connects to it meanwhile
    except BaseException:
        await fillers.finish(f, 0.0)
        _unlink(path)
        raise
    if stream and job.cache is not None and job.prefetch is not None:
        digests = job.record.chunk_sizes()
        names = asyncio.create_task(announce(f, job.cache, digests, job.prefetch), name=f"names {f.proc.pid}")
    ok = False
    try:
        yield Fill(FdHandover(str(path), fallback=str(chunks)), _Filled(job.prefetch, f))
        ok = True
    finally:
        if names is not None:
            names.cancel()
            await asyncio.gather(names, return_exceptions=True)
        if ok:  # the workload holds the memory: the filler's release and exit are off its path
            fillers.later(_settle(job, f, fillers, path, WAIT_S), f"settle filler {f.proc.pid}")
        else:
            await _settle(job, f, fillers, path, 0.0)


async def _settle(job: Job, f: Filler, fillers: Fillers, path: Path, wait_s: float) -> None:
    """Wait up to `wait_s` for `f` to end (killed after) and log what it said."""
    try:
        out, rc = await fillers.finish(f, wait_s)
        if rc is None:
            log.warning("weights filler for %s stopped before it was done", job.run_dir.name)
        else:
            _report(job.record, out, rc)
    finally:
        _unlink(path)


class _Filled:
    """Awaitable (once or not at all): the weights' prefetch (its failure raised), then the
    filler's fill done (or failed: the workload then fills itself)."""

    def __init__(self, prefetch: asyncio.Future[Any] | None, f: Filler) -> None:
        self.prefetch = prefetch
        self.f = f

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        if self.prefetch is not None:
            await self.prefetch
        await self.f.filled.wait()


def socket_path(run_dir: Path) -> Path:
    """The run dir's socket, or where its path is longer than a Unix socket's may be (108 bytes),
    one in a fresh directory under the temp dir."""
    path = run_dir / SOCKET_NAME
    if len(os.fsencode(path)) < SUN_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="snapscale-fill-")) / SOCKET_NAME


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a socket an earlier attempt left
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
    if path.parent.name.startswith("snapscale-fill-"):
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def _report(record: WeightsRecord, out: bytes, rc: int | None) -> None:
    last = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
    try:
        said = json.loads(last[0])
    except ValueError:
        said = {"output": out.decode(errors="replace")[-2000:]}
    if rc == 0:
        log.info("weights filled by the host: %d bytes, %s", record.nbytes, said)
    else:
        log.warning("weights filler exited %s: %s", rc, said)
