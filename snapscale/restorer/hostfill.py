"""Where a restored or resumed workload's weights come from. The host cache's chunk files, or with
SNAPSCALE_WEIGHTS_FILL=host a filling process started beside the CRIU restore or the CUDA resume
(`python -m snapscale.workload.handover`) fills new GPU memory with them from the host cache
meanwhile, and hands it to the workload as an fd in after_restore, so the fill is off the critical
path (docs/weights.md).

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
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

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


@contextlib.asynccontextmanager
async def weights_source(
    fill: str, image_dir: Path, chunks: Path, gpu_uuids: list[str], run_dir: Path,
    ready: Awaitable[object] | None = None,
) -> AsyncIterator[FillSource]:  # fmt: skip
    """Where a restore's workload gets its weights, for the restore: the host cache's chunk files
    (`chunks`), or with `fill` "host" on a GPU replica, memory a filler fills meanwhile (once
    `ready`, the weights' prefetch, is done)."""
    if fill != "host" or not gpu_uuids:
        yield ChunkDir(str(chunks))
        return
    record = read_weights(image_dir)
    if record is None:
        raise EngineError("restore", f"{image_dir} has no weights record to fill from")
    if record.arena.kind != CudaArena.kind:  # weights in host memory: the workload fills them
        yield ChunkDir(str(chunks))
        return
    gpu = target_gpu(record, gpu_uuids)
    async with host_fill(record, image_dir / IMAGE_FILE, chunks, gpu, run_dir, ready) as source:
        yield source


@contextlib.asynccontextmanager
async def resume_source(
    cache: HostCache, fill: str, sb: Sandbox, gpu_uuids: list[str]
) -> AsyncIterator[FillSource | None]:
    """Where a resumed sandbox's released weights come from, for the resume: the host cache's chunk
    files when this process has hashed every one (a replica restored from a checkpoint with
    weights), pinned meanwhile; with `fill` "host" on GPUs, memory a filler fills beside the CUDA
    resume. Else None: the workload's own files, verified."""
    record = suspended_weights(sb)
    need = set(record.chunk_sizes()) if record is not None else set()
    with cache.pinned(need):  # nothing evicts them while they are read
        if record is None or not need or not all(cache.verified(d) for d in need):
            yield None
        elif fill == "host" and gpu_uuids and record.arena.kind == CudaArena.kind:
            gpu, run_dir = target_gpu(record, gpu_uuids), Path(sb.run_dir)
            async with host_fill(record, run_dir / IMAGE_FILE, cache.chunks_dir, gpu, run_dir) as source:
                yield source
        else:
            yield ChunkDir(str(cache.chunks_dir))


@contextlib.asynccontextmanager
async def host_fill(
    record: WeightsRecord, record_path: Path, chunks: Path, gpu: str, run_dir: Path,
    ready: Awaitable[object] | None = None,
) -> AsyncIterator[FdHandover]:  # fmt: skip
    """A filler filling `record`'s weights onto `gpu` from `chunks` (started once `ready` is done),
    for the block: the source to give the engine. A filler still running after the block is
    stopped; what it said is logged (its fill time, or why it failed: the workload then fills from
    `chunks` itself)."""
    path = socket_path(run_dir)
    listener = _listen(path)

    async def start() -> asyncio.subprocess.Process:
        try:
            if ready is not None:
                await ready
            # The restorer's own environment: every GPU of the host visible, as NVML numbers them.
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "snapscale.workload.handover", "--record", str(record_path),
                "--chunks", str(chunks), "--gpu", gpu, "--listen-fd", str(listener.fileno()),
                pass_fds=(listener.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        finally:
            listener.close()  # the filler holds its copy; the workload connects to it meanwhile

    starting = asyncio.create_task(start(), name=f"weights filler {run_dir.name}")
    ok = False
    try:
        yield FdHandover(str(path), fallback=str(chunks))  # a filler that fails costs only speed
        ok = True
    finally:
        if not ok:
            starting.cancel()
        (proc,) = await asyncio.gather(starting, return_exceptions=True)
        if isinstance(proc, asyncio.subprocess.Process):
            await _settle(proc, record, run_dir, WAIT_S if ok else 0.001)
        _unlink(path)


async def _settle(
    proc: asyncio.subprocess.Process, record: WeightsRecord, run_dir: Path, wait_s: float
) -> None:
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), wait_s)
        _report(record, out, proc.returncode)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log.warning("weights filler for %s stopped before it was done", run_dir.name)


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
