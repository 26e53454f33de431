"""The freeze/restore engine: one sandbox's cold boot, freeze, restore, suspend, resume and stop.

freeze = before_freeze hook -> CUDA lock+checkpoint -> criu dump -> (CUDA restore+unlock, after_restore
hook when it keeps serving). restore = criu restore -> CUDA restore+unlock -> after_restore -> ready.
suspend/resume keep the processes in RAM; before_suspend/after_resume run the same hooks around them.
A workload that keeps its weights outside the image (`snapscale.workload`) is offered to release
them in before_freeze; its record goes into the image dir, and after_restore is told where to fill
them from (docs/weights.md). Every step is timed and traced. No chunking, S3 or NATS here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace

from snapscale.shared.bus.spec import DeploymentSpec, ReadySpec
from snapscale.shared.core.pause import pause_point
from snapscale.shared.engine import cuda as cuda_ckpt
from snapscale.shared.engine import netns, probe, runtime, sandbox, tcpimg, zeropages
from snapscale.shared.engine import pages as criu_pages
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.engine.errors import (
    CriuError,
    CudaError,
    EngineError,
    HookError,
    NoCudaError,
    ReadyTimeout,
    SandboxExited,
)
from snapscale.shared.engine.runtime import launch, stop
from snapscale.shared.engine.sandbox import Sandbox
from snapscale.workload import FillSource, SourceFiles, WeightsError, WeightsRecord
from snapscale.workload import hooks as weights_hooks
from snapscale.workload.record import IMAGE_FILE as WEIGHTS_NAME

__all__ = [
    "CriuError",
    "CudaError",
    "EngineError",
    "FreezeReport",
    "HookError",
    "NoCudaError",
    "ReadyTimeout",
    "RestoreReport",
    "Sandbox",
    "SandboxExited",
    "after_resume",
    "before_suspend",
    "freeze",
    "launch",
    "read_weights",
    "restore",
    "resume",
    "stop",
    "suspend",
    "suspended_weights",
    "wait_ready",
]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

META_NAME = "snapscale-engine.json"  # written into the image dir; CRIU ignores files it does not know
META_FORMAT = 1


@dataclass(frozen=True)
class FreezeReport:
    timings_s: dict[str, float]
    image_bytes: int
    keep_running: bool
    cuda: bool
    criu_stats: dict[str, int] = field(default_factory=dict)
    zero_bytes_dropped: int = 0  # all-zero pages taken out of the image (criu_pages)
    weights_bytes: int = 0  # weights the workload released: outside the image, in its record


@dataclass(frozen=True)
class RestoreReport:
    timings_s: dict[str, float]
    cuda: bool
    gpu_pairs: list[tuple[str, str]] = field(default_factory=list)
    criu_stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageMeta:
    """What a restore needs to know about the frozen sandbox beyond CRIU's own image."""

    deployment: str
    log_key: str  # CRIU's name for the frozen stdio log (path, or external key), replaced by the new log
    cuda: bool
    gpu_uuids: list[str]
    port: int
    frozen_at: float
    format: int = META_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ImageMeta:
        try:
            d = json.loads(data)
            if d.get("format") != META_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, this engine reads {META_FORMAT}")
            return cls(
                deployment=str(d["deployment"]),
                log_key=str(d["log_key"]),
                cuda=bool(d["cuda"]),
                gpu_uuids=[str(u) for u in d["gpu_uuids"]],
                port=int(d["port"]),
                frozen_at=float(d["frozen_at"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError("restore", f"{META_NAME} in the image is unreadable: {e}") from None


def log_key(log_path: str) -> str:
    """CRIU names a regular file by its path without the leading slash (`--inherit-fd fd[N]:<key>`)."""
    return log_path.lstrip("/")


@contextlib.contextmanager
def _step(timings: dict[str, float], name: str, sb: Sandbox | None = None) -> Iterator[None]:
    attrs = {"snapscale.replica": sb.replica, "snapscale.deployment": sb.deployment} if sb else {}
    start = time.monotonic()
    with _tracer.start_as_current_span(f"engine.{name}", attributes=attrs):
        try:
            yield
        finally:
            timings[name] = round(time.monotonic() - start, 4)


def _tail(sb: Sandbox) -> str:
    return sandbox.log_tail(sb.log_path)


async def wait_ready(
    sb: Sandbox, ready: ReadySpec, *, cwd: str | None = None, timeout_s: float | None = None
) -> float:
    """Probe until ready (seconds waited); a dead sandbox fails at once (with the reason the system
    recorded, e.g. its memory limit), a late one with `ReadyTimeout`."""
    try:
        return await probe.wait_ready(
            sb.endpoint,
            ready,
            alive=lambda: sandbox.is_running(sb),
            log_tail=lambda: _tail(sb),
            base_dir=Path(cwd) if cwd else None,
            timeout_s=timeout_s,
        )
    except SandboxExited as e:
        why = runtime.exit_reason(sb)
        if why is None:
            raise
        raise SandboxExited(e.step, f"{why} ({e.reason})", e.log_tail) from None


async def _hook(step: str, sb: Sandbox, path: str, timeout_s: float, body: bytes = b"") -> bytes:
    return await probe.run_hook(
        step, sb.endpoint, path, timeout_s=timeout_s, log_tail=lambda: _tail(sb), body=body
    )


async def _before_freeze(sb: Sandbox, spec: DeploymentSpec, keep_running: bool) -> WeightsRecord | None:
    """The before_freeze hook; the record of the weights the workload released, if it did.

    The offer to carry weights goes only with an after_restore hook to bring them back. A record
    that does not read is refused (nothing is dumped), after a keep-running workload is told to
    fill its weights back from its own files.
    """
    hooks = spec.hooks
    assert hooks.before_freeze is not None
    offer = weights_hooks.freeze_request(release=True) if hooks.after_restore else b""
    answer = await _hook("before_freeze", sb, hooks.before_freeze, hooks.timeout_s, offer)
    try:
        return weights_hooks.read_freeze_answer(answer)
    except WeightsError as e:
        if keep_running and hooks.after_restore:
            with contextlib.suppress(EngineError):
                body = weights_hooks.restore_request(SourceFiles())
                await _hook("after_restore", sb, hooks.after_restore, hooks.timeout_s, body)
        raise HookError(
            "before_freeze", f"the workload's weights record is unusable: {e}", _tail(sb)
        ) from None


def _image_bytes(image_dir: Path) -> int:
    return sum(p.stat().st_size for p in image_dir.rglob("*") if p.is_file())


async def freeze(
    sb: Sandbox,
    spec: DeploymentSpec,
    image_dir: Path,
    *,
    keep_running: bool,
    criu: CriuBinary,
    lock_timeout_ms: int = cuda_ckpt.DEFAULT_LOCK_TIMEOUT_MS,
    drop_zero_pages: bool = True,
    on_weights: Callable[[WeightsRecord], object] | None = None,
) -> FreezeReport:
    """Capture the sandbox into `image_dir`. Without `keep_running` the sandbox is gone afterwards.

    A failing step raises; a sandbox that should keep running is brought back to serving first.
    With `drop_zero_pages` the image loses its all-zero anonymous pages, so a restore does not
    write them: on a thread from the end of the dump, beside the sandbox's resume or stop (outside
    the freeze window; `drop_zero_pages_wait` is the part of it they did not hide). `on_weights`
    gets the record of released weights as soon as before_freeze returns it (the freezer starts
    their upload then, beside the CUDA checkpoint and the dump).
    """
    if not sandbox.is_running(sb):
        raise SandboxExited("freeze", f"sandbox {sb.replica} (pid {sb.pid}) is not running", _tail(sb))
    t: dict[str, float] = {}
    hooks = spec.hooks
    weights: WeightsRecord | None = None
    with _step(t, "freeze", sb):
        if hooks.before_freeze:
            with _step(t, "before_freeze", sb):
                weights = await _before_freeze(sb, spec, keep_running)
            if weights is not None and on_weights is not None:
                on_weights(weights)
        drv: cuda_ckpt.CudaCheckpoint | None = None
        cuda_pids: list[int] = []
        if sb.gpu_uuids:
            drv = cuda_ckpt.driver()
            cuda_pids = cuda_ckpt.holders(sandbox.tree_pids(sb))
        try:
            if drv is not None and cuda_pids:
                with _step(t, "cuda_checkpoint", sb):
                    await drv.suspend_tree(cuda_pids, lock_timeout_ms)
            outside = runtime.outside_files(sb)  # a restored replica's log, held from the host
            meta = ImageMeta(
                deployment=sb.deployment,
                log_key=outside[0] if outside else log_key(sb.log_path),
                cuda=bool(cuda_pids),
                gpu_uuids=list(sb.gpu_uuids),
                port=spec.port,
                frozen_at=time.time(),
            )
            _write_meta(image_dir, meta)
            await pause_point("criu_dump")
            if weights is not None:
                _write_file(image_dir, WEIGHTS_NAME, weights.to_json())
            with _step(t, "criu_dump", sb):
                run = await runtime.dump(
                    sb,
                    image_dir,
                    criu=criu,
                    leave_running=keep_running,
                    log_path=Path(sb.run_dir or image_dir.parent)
                    / f"criu-dump-{int(time.time() * 1000)}.log",
                    external_files=outside,
                )
        except BaseException:
            # CRIU resumes the tree when a dump fails; give it its GPU back so it keeps serving.
            if drv is not None and cuda_pids and sandbox.is_running(sb):
                with contextlib.suppress(CudaError):
                    await drv.resume_tree(cuda_pids)
            if keep_running and weights is not None and hooks.after_restore and sandbox.is_running(sb):
                with contextlib.suppress(EngineError):  # and its weights: it cannot serve without
                    body = weights_hooks.restore_request(SourceFiles())
                    await _hook("after_restore", sb, hooks.after_restore, hooks.timeout_s, body)
            raise
        # The image is whole: it is finished (TCP connections, zero pages) while the sandbox is
        # brought back or stopped.
        finishing = asyncio.create_task(_finish_image(sb, image_dir, t, drop_zero_pages=drop_zero_pages))
        try:
            if keep_running:
                if drv is not None and cuda_pids:
                    with _step(t, "cuda_restore", sb):
                        await drv.resume_tree(cuda_pids)
                if hooks.before_freeze and hooks.after_restore:
                    # It keeps serving: undo what before_freeze dropped (e.g. re-allocate the KV
                    # cache); released weights come back from the workload's own files, verified.
                    body = b"" if weights is None else weights_hooks.restore_request(SourceFiles())
                    with _step(t, "after_restore", sb):
                        await _hook("after_restore", sb, hooks.after_restore, hooks.timeout_s, body)
            else:
                with _step(t, "stop", sb):
                    await stop(sb)
                runtime.mark_stopped_by_freeze(sb, image_dir)
        except BaseException:
            # A thread cannot be stopped: the image dir is the pass's until it ends.
            await asyncio.gather(finishing, return_exceptions=True)
            raise
    with _step(t, "drop_zero_pages_wait", sb):  # what the steps above did not hide of it
        dropped = await finishing
    size = _image_bytes(image_dir)
    log.info("froze %s into %s: %d bytes (%d zero dropped), %s", sb.replica, image_dir, size, dropped, t)
    return FreezeReport(
        timings_s=t,
        image_bytes=size,
        keep_running=keep_running,
        cuda=bool(cuda_pids),
        criu_stats=run.stats,
        zero_bytes_dropped=dropped,
        weights_bytes=0 if weights is None else weights.nbytes,
    )


async def _finish_image(sb: Sandbox, image_dir: Path, t: dict[str, float], *, drop_zero_pages: bool) -> int:
    """The dumped image's TCP connections rewritten, then (`drop_zero_pages`) its all-zero
    anonymous pages dropped (zeropages) on a thread; the bytes dropped. Its steps are timed in `t`."""
    with _step(t, "close_external_tcp", sb):
        _close_external_tcp(sb, image_dir)
    if not drop_zero_pages:
        return 0
    with _step(t, "drop_zero_pages", sb):
        try:
            return (await asyncio.to_thread(zeropages.drop_zero_pages, image_dir)).bytes_dropped
        except criu_pages.CriuImageError as e:  # every pages/pagemap pair left whole
            log.warning("freeze %s: zero pages kept in the image: %s", sb.replica, e)
            return 0
        except OSError as e:  # a pair half rewritten: this image must not ship
            raise CriuError("drop_zero_pages", f"the image cannot be compacted: {e}") from None


def _close_external_tcp(sb: Sandbox, image_dir: Path) -> None:
    """Connections that leave the sandbox come back closed, loopback ones working (tcpimg.py)."""
    try:
        conns = tcpimg.close_external(image_dir)
    except criu_pages.CriuImageError as e:  # a restore would fail on the unrewritten connections
        raise CriuError("criu_dump", f"the image's TCP connections cannot be rewritten: {e}") from None
    if conns:
        log.info("freeze %s: TCP connections %s", sb.replica, [(c.local, c.peer, c.loopback) for c in conns])


def _write_meta(image_dir: Path, meta: ImageMeta) -> None:
    _write_file(image_dir, META_NAME, meta.to_json())


def _write_file(image_dir: Path, name: str, data: bytes) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = image_dir / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.rename(image_dir / name)


def read_weights(image_dir: Path) -> WeightsRecord | None:
    """The record of the weights kept outside this image, or None when they are inside it."""
    try:
        data = (image_dir / WEIGHTS_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise EngineError("restore", f"{WEIGHTS_NAME} in the image is unreadable: {e.strerror}") from None
    try:
        return WeightsRecord.from_json(data, WEIGHTS_NAME)
    except WeightsError as e:
        raise EngineError("restore", f"{WEIGHTS_NAME} in the image is unusable: {e}") from None


def read_meta(image_dir: Path) -> ImageMeta:
    try:
        return ImageMeta.from_json((image_dir / META_NAME).read_bytes())
    except OSError as e:
        raise EngineError(
            "restore", f"{image_dir} holds no snapscale image ({META_NAME}: {e.strerror})"
        ) from None


async def restore(
    spec: DeploymentSpec,
    image_dir: Path,
    replica: str,
    *,
    gpu_uuids: list[str],
    run_dir: Path,
    criu: CriuBinary,
    checkpoint_id: str | None = None,
    weights: FillSource | None = None,
    weights_ready: Awaitable[object] | None = None,
    criu_log_level: int = 2,
) -> tuple[Sandbox, RestoreReport]:
    """Bring a frozen sandbox back as `replica` in a fresh netns, on `gpu_uuids`, and wait until ready.

    An image whose weights are outside it has them filled in after_restore from `weights` (the
    host cache's chunks, for a restorer), by default from the source files its record names;
    `weights_ready` (the weights' prefetch, still running) is awaited before after_restore.
    `criu_log_level` 4 logs every CRIU step with a timestamp (engine/criu_profile.py reads it).
    On any failure whatever half-started is killed, its netns removed, and a typed error raised.
    """
    meta = read_meta(image_dir)
    if meta.deployment != spec.name:
        raise EngineError("restore", f"image is of deployment {meta.deployment!r}, not {spec.name!r}")
    record = read_weights(image_dir)
    after_body = b""
    if record is not None:
        if not spec.hooks.after_restore:
            raise EngineError(
                "restore", "the image's weights are outside it and the spec has no after_restore hook"
            )
        after_body = weights_hooks.restore_request(weights or SourceFiles())
    drv = cuda_ckpt.driver() if meta.cuda else None  # no CUDA here: fail before starting anything
    pairs = cuda_ckpt.remap_pairs(meta.gpu_uuids, gpu_uuids, drv.host_uuids()) if drv is not None else []
    t: dict[str, float] = {}
    sandbox.become_subreaper()
    with _step(t, "restore"):
        with _step(t, "sandbox_prepare"):  # the netns and, for a container, its root, at once
            prepared = await runtime.prepare_restore(
                spec, image_dir, replica, gpu_uuids=gpu_uuids, run_dir=run_dir
            )
        ns = prepared.ns
        log_path = run_dir / sandbox.LOG_NAME
        try:
            with _step(t, "criu_restore"):
                await pause_point("criu_restore")
                run = await runtime.restore_tree(
                    spec,
                    image_dir,
                    replica,
                    prepared=prepared,
                    log_key=meta.log_key,
                    gpu_uuids=gpu_uuids,
                    run_dir=run_dir,
                    criu=criu,
                    log_level=criu_log_level,
                )
        except BaseException:
            await runtime.discard(prepared, run_dir)
            await stop(_placeholder(ns, replica, spec, log_path))
            raise
        sb = Sandbox(
            replica=replica,
            deployment=spec.name,
            pid=run.pid,
            netns=ns.name,
            endpoint=f"{ns.sandbox_ip}:{meta.port}",
            gpu_uuids=list(gpu_uuids) if meta.cuda else [],
            log_path=str(log_path),
            started_at=time.time(),
            checkpoint_id=checkpoint_id,
            run_dir=str(run_dir),
            container=replica if spec.sandbox.image is not None else "",
        )
        try:
            if drv is not None:
                with _step(t, "cuda_restore", sb):
                    await drv.resume_tree(sandbox.tree_pids(sb), pairs)
            await pause_point("after_restore")
            if weights_ready is not None:
                with _step(t, "weights_wait", sb):
                    await weights_ready
            if spec.hooks.after_restore:
                with _step(t, "after_restore", sb):
                    hooks = spec.hooks
                    assert hooks.after_restore is not None
                    await _hook("after_restore", sb, hooks.after_restore, hooks.timeout_s, after_body)
            with _step(t, "ready_probe", sb):
                await wait_ready(sb, spec.ready, cwd=spec.cwd)
        except BaseException:
            # A half-restored tree (a failed CUDA restore leaves it stuck) is of no use to anyone.
            await stop(sb)
            raise
    log.info("restored %s from %s at %s: %s", replica, image_dir, sb.endpoint, t)
    return sb, RestoreReport(timings_s=t, cuda=meta.cuda, gpu_pairs=pairs, criu_stats=run.stats)


def _placeholder(ns: netns.NetNs, replica: str, spec: DeploymentSpec, log_path: Path) -> Sandbox:
    """A Sandbox for cleanup before any process exists: pid 0 is never killed, the netns is."""
    return Sandbox(
        replica=replica, deployment=spec.name, pid=0, netns=ns.name, endpoint="", log_path=str(log_path)
    )


async def suspend(
    sb: Sandbox, *, lock_timeout_ms: int = cuda_ckpt.DEFAULT_LOCK_TIMEOUT_MS
) -> dict[str, float]:
    """Move the sandbox's GPU state to host memory and free its GPUs; the processes stay in RAM."""
    if not sb.gpu_uuids:
        raise CudaError("suspend", f"sandbox {sb.replica} is a CPU sandbox: it holds no GPU to free")
    drv = cuda_ckpt.driver()
    pids = cuda_ckpt.holders(sandbox.tree_pids(sb))
    if not pids:
        raise CudaError("suspend", f"no process of sandbox {sb.replica} holds CUDA state", _tail(sb))
    t: dict[str, float] = {}
    with _step(t, "suspend", sb):
        try:
            await drv.suspend_tree(pids, lock_timeout_ms)
        except CudaError:
            with contextlib.suppress(CudaError):
                await drv.resume_tree(pids)
            raise
    return t


async def resume(sb: Sandbox, gpu_uuids: list[str]) -> Sandbox:
    """Give a suspended sandbox its GPU state back, on `gpu_uuids` (which may be other cards)."""
    drv = cuda_ckpt.driver()
    pairs = cuda_ckpt.remap_pairs(sb.gpu_uuids, gpu_uuids, drv.host_uuids())
    t: dict[str, float] = {}
    with _step(t, "resume", sb):
        await drv.resume_tree(sandbox.tree_pids(sb), pairs)
    log.info("resumed %s on %s in %.2fs", sb.replica, gpu_uuids, t["resume"])
    return sb.with_gpus(gpu_uuids)


async def before_suspend(sb: Sandbox, spec: DeploymentSpec) -> WeightsRecord | None:
    """The workload's half of a suspend, before the CUDA suspend (or a CPU sandbox's SIGSTOP):
    before_freeze, offered to release its weights, whose record is kept in the run dir until
    `after_resume` fills them back. Only for a spec with both hooks: what before_freeze drops,
    after_restore must bring back. The record of a weights-releasing workload, or None.
    """
    hooks = spec.hooks
    if not (hooks.before_freeze and hooks.after_restore):
        return None
    if not sb.run_dir:  # nowhere to keep a record: run the hook without the offer
        await _hook("before_freeze", sb, hooks.before_freeze, hooks.timeout_s)
        return None
    record = await _before_freeze(sb, spec, keep_running=True)
    if record is not None:
        _write_file(Path(sb.run_dir), WEIGHTS_NAME, record.to_json())
    return record


def suspended_weights(sb: Sandbox) -> WeightsRecord | None:
    """The record of the weights a suspended sandbox released (`before_suspend`), or None."""
    return read_weights(Path(sb.run_dir)) if sb.run_dir else None


async def after_resume(sb: Sandbox, spec: DeploymentSpec, weights: FillSource | None = None) -> float:
    """The workload's half of a resume, after the CUDA resume (or SIGCONT): after_restore, told to
    fill released weights from `weights` (default: the workload's own files, verified). Seconds."""
    hooks = spec.hooks
    if not (hooks.before_freeze and hooks.after_restore):
        return 0.0
    record = suspended_weights(sb)
    body = b"" if record is None else weights_hooks.restore_request(weights or SourceFiles())
    t: dict[str, float] = {}
    with _step(t, "after_restore", sb):
        await _hook("after_restore", sb, hooks.after_restore, hooks.timeout_s, body)
    if record is not None:
        (Path(sb.run_dir) / WEIGHTS_NAME).unlink(missing_ok=True)
    return t["after_restore"]
