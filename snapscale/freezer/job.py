"""One freeze, end to end: sandbox -> engine freeze into a staging dir -> chunks and signed
manifest in the store -> catalog entry -> checkpoint event, resumable from the ledger's phase.

No NATS consuming or acking here (service.py does that); no CRIU or chunk code of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from snapscale.freezer import claims, metrics
from snapscale.freezer.decide import Action, ClaimVerdict, FreezeDecision, after_claim, before_claim
from snapscale.freezer.ids import new_checkpoint_id
from snapscale.freezer.ledger import Attempt, Ledger, Phase
from snapscale.freezer.specs import SpecUnknown, spec_at
from snapscale.shared import bus, engine
from snapscale.shared.bus import (
    Bucket,
    CatalogEntry,
    CheckpointEvent,
    FreezeCommand,
    lookup_entry,
    lookup_refusal,
    publish_entry,
)
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import RetryableError, SnapscaleError
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import CriuBinary, EngineError, Sandbox, SandboxRegistry, host_key
from snapscale.shared.store import ChunkStore, EarlyUpload, upload_image, upload_weights
from snapscale.workload import WeightsRecord

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


class FreezeFailed(SnapscaleError):
    """This command cannot freeze (no such sandbox, no spec): report it, do not retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Context:
    """What one freeze works with; `held` is the auto-freeze claim once taken (renewed by the
    service while the freeze runs, released when the freeze ends without a catalog entry)."""

    settings: Settings
    bus: bus.Bus
    store: ChunkStore
    criu: CriuBinary
    ledger: Ledger
    registry: SandboxRegistry
    claim_ttl_s: float
    chunk_bytes: int | None = None
    held: claims.Held | None = None
    claim_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # the service renews `held`
    on_phase: Callable[[Phase], Awaitable[None]] | None = None  # tests observe progress here


def event_for(cmd: FreezeCommand, host: str, **kw: object) -> CheckpointEvent:
    return CheckpointEvent(
        deployment=cmd.deployment,
        host=host,
        ts=time.time(),
        command_id=cmd.id,
        replica=cmd.replica,
        **kw,  # type: ignore[arg-type]
    )


def find_sandbox(ctx: Context, cmd: FreezeCommand) -> Sandbox:
    try:
        sb = ctx.registry.get(cmd.replica)
    except EngineError as e:  # a replica id that cannot be a record name
        raise FreezeFailed(e.reason) from None
    if sb is None:
        raise FreezeFailed(f"no sandbox for replica {cmd.replica} on host {ctx.settings.host_id}")
    if sb.deployment != cmd.deployment:
        raise FreezeFailed(f"replica {cmd.replica} runs deployment {sb.deployment}, not {cmd.deployment}")
    return sb


async def run(ctx: Context, cmd: FreezeCommand) -> CheckpointEvent:
    """Freeze for `cmd` (or resume its interrupted attempt) and return the event to publish.

    Raises `RetryableError` for trouble worth another delivery (store or NATS unreachable); the
    ledger keeps what was done so that delivery resumes instead of starting over.
    """
    host = ctx.settings.host_id
    attempt = ctx.ledger.attempt(cmd.id)
    if attempt is not None and attempt.phase is not Phase.FREEZING:
        log.info("resuming freeze %s of %s at phase %s", attempt.checkpoint_id, cmd.deployment, attempt.phase)
        if not cmd.force:  # take our claim back (it is ours unless it expired and was taken)
            ctx.held, _ = await claims.try_claim(
                ctx.bus.kv[Bucket.LEASES],
                cmd.deployment,
                attempt.compat_hash,
                host=host,
                command_id=cmd.id,
                now=time.time(),
                ttl_s=ctx.claim_ttl_s,
            )
        return await _finish(ctx, cmd, attempt)
    if attempt is not None:  # crashed mid-dump: that image is partial
        ctx.ledger.drop_staging(attempt.checkpoint_id)

    try:
        sb = find_sandbox(ctx, cmd)
        try:  # the spec it runs, which a redeploy since may have replaced in KV
            spec = await spec_at(ctx.bus.kv[Bucket.DEPLOYMENTS], cmd.deployment, sb.started_at)
        except SpecUnknown as e:
            raise FreezeFailed(f"replica {sb.replica}: {e}") from None
        if len(sb.gpu_uuids) != spec.gpus:
            raise FreezeFailed(
                f"replica {sb.replica} holds {len(sb.gpu_uuids)} GPUs, its spec asks {spec.gpus}"
            )
    except FreezeFailed as e:
        return event_for(cmd, host, ok=False, reason=e.reason)
    # The key a restorer computes for this spec (gpu_count from the spec, as it does). It hashes the
    # interpreter and the spec's image files and asks NVML: off the loop, so heartbeats keep going.
    key = await asyncio.to_thread(host_key, spec, criu=ctx.criu, gpu_count=spec.gpus)
    compat, compat_hash = key.as_dict(), key.hash()

    decision = await _decide(ctx, cmd, compat_hash)
    if decision.action is Action.SKIP:
        log.info("freeze %s of %s skipped: %s", cmd.id, cmd.deployment, decision.reason)
        # checkpoint_id: the key's checkpoint when the catalog has one, so listeners learn it
        return event_for(
            cmd, host, ok=True, skipped=True, reason=decision.reason, compat=compat, compat_hash=compat_hash,
            checkpoint_id=decision.checkpoint_id,
        )  # fmt: skip

    ckpt = new_checkpoint_id()
    staging = ctx.ledger.staging_dir(ckpt)
    attempt = Attempt(
        command_id=cmd.id,
        deployment=cmd.deployment,
        replica=cmd.replica,
        checkpoint_id=ckpt,
        staging_dir=str(staging),
        phase=Phase.FREEZING,
        started_at=time.time(),
        keep_running=cmd.keep_running,
        compat=compat,
        compat_hash=compat_hash,
    )
    ctx.ledger.save(attempt)
    span = trace.get_current_span()
    span.set_attribute("snapscale.checkpoint_id", ckpt)
    early: list[asyncio.Task[EarlyUpload]] = []  # the released weights' chunks, going up already

    def upload_early(record: WeightsRecord) -> None:
        up = upload_weights(ctx.store, record)
        early.append(asyncio.create_task(up, name=f"weights of {ckpt}"))

    try:
        report = await engine.freeze(
            sb, spec, staging, keep_running=cmd.keep_running, criu=ctx.criu, on_weights=upload_early
        )
    except BaseException as e:
        for task in early:
            task.cancel()
        await asyncio.gather(*early, return_exceptions=True)
        if not isinstance(e, EngineError):
            raise
        ctx.ledger.drop_staging(ckpt)
        await release_claim(ctx)
        reason = f"{e.step}: {e.reason}"
        if e.log_tail:
            reason += f"\n{e.log_tail}"
        named = engine.refusal(e)
        metrics.record_failure(named)
        log.error(
            "freeze %s of %s/%s failed at %s (%s): %s",
            ckpt,
            cmd.deployment,
            cmd.replica,
            e.step,
            named,
            e.reason,
        )
        return event_for(
            cmd, host, ok=False, reason=reason, compat=compat, compat_hash=compat_hash, refusal=named
        )
    attempt = attempt.advance(Phase.DUMPED, timings_s=dict(report.timings_s))
    ctx.ledger.save(attempt)
    await _notify(ctx, Phase.DUMPED)
    return await _finish(ctx, cmd, attempt, early[0] if early else None)


async def _decide(ctx: Context, cmd: FreezeCommand, compat_hash: str) -> FreezeDecision:
    found = await lookup_entry(ctx.bus.kv[Bucket.CHECKPOINTS], cmd.deployment, compat_hash)
    refused = (
        None if cmd.force else await lookup_refusal(ctx.bus.kv[Bucket.LEASES], cmd.deployment, compat_hash)
    )
    early = before_claim(cmd, done=False, catalog=found[0] if found else None, refused=refused)
    if early is not None:
        return early
    held, holder = await claims.try_claim(
        ctx.bus.kv[Bucket.LEASES],
        cmd.deployment,
        compat_hash,
        host=ctx.settings.host_id,
        command_id=cmd.id,
        now=time.time(),
        ttl_s=ctx.claim_ttl_s,
    )
    ctx.held = held
    if held is None:
        return after_claim(ClaimVerdict.HELD, holder)
    return FreezeDecision(Action.FREEZE, "claimed")


async def _finish(
    ctx: Context, cmd: FreezeCommand, a: Attempt, early: asyncio.Task[EarlyUpload] | None = None
) -> CheckpointEvent:
    """From a complete image in staging: upload, manifest, catalog. Each step is recorded.
    `early`: the weights' chunks, uploading since before_freeze; if it failed, they go up here."""
    host = ctx.settings.host_id
    if a.phase is Phase.DUMPED:
        t0_ns = time.time_ns()
        done = await _early_result(early)
        _manifest, mkey, up = await upload_image(
            ctx.store,
            ctx.ledger.staging_dir(a.checkpoint_id),  # from the id, never the path the record holds
            deployment=a.deployment,
            checkpoint_id=a.checkpoint_id,
            compat=a.compat,
            compat_hash=a.compat_hash,
            signing_key=ctx.settings.require_signing_key(),
            timings_s=a.timings_s | ({"weights_upload_s": done.seconds} if done else {}),
            chunk_bytes=ctx.chunk_bytes,
            early=done,
        )
        sizes = {
            "total": up.total_bytes,
            "unique": up.unique_bytes,
            "new": up.new_bytes,
            "zero": up.zero_bytes,
        }
        if up.weight_bytes:  # weights outside the image (in unique and new too)
            sizes["weights"] = up.weight_bytes
        attrs: dict[str, int] = {f"upload.{k}_bytes": v for k, v in sizes.items()}
        attrs.update({"upload.chunks": up.chunks, "upload.new_chunks": up.new_chunks})
        _phase_spans(t0_ns, time.time_ns(), up.timings_s, attrs)
        timings = dict(up.timings_s)
        timings["upload_total_s"] = round((time.time_ns() - t0_ns) / 1e9, 4)
        a = a.advance(Phase.UPLOADED, manifest_key=mkey, sizes=sizes, timings_s=timings)
        ctx.ledger.save(a)
        await _notify(ctx, Phase.UPLOADED)
    if a.phase is Phase.UPLOADED:
        t0 = time.monotonic()
        with tracer.start_as_current_span("catalog"):
            written, ours = await _catalog(ctx, cmd, a)
        if not ours:
            await release_claim(ctx)
            reason = (
                f"another freezer cataloged {written.checkpoint_id} for this key first;"
                f" this freeze's {a.checkpoint_id} stays unlisted"
            )
            return event_for(
                cmd, host, ok=True, skipped=True, checkpoint_id=written.checkpoint_id, reason=reason,
                compat=a.compat, compat_hash=a.compat_hash, sizes=a.sizes, timings_s=a.timings_s,
            )  # fmt: skip
        timings = dict(a.timings_s)
        timings["catalog_s"] = round(time.monotonic() - t0, 4)
        a = a.advance(Phase.CATALOGED, timings_s=timings, previous_id=written.previous_id)
        ctx.ledger.save(a)
        await _notify(ctx, Phase.CATALOGED)
    await release_claim(ctx)
    timings = dict(a.timings_s)
    timings["total_s"] = round(time.time() - a.started_at, 4)
    return event_for(
        cmd,
        host,
        ok=True,
        checkpoint_id=a.checkpoint_id,
        compat=a.compat,
        compat_hash=a.compat_hash,
        sizes=a.sizes,
        timings_s=timings,
        reason=f"replaces {a.previous_id}" if a.previous_id else "",
    )


async def _early_result(early: asyncio.Task[EarlyUpload] | None) -> EarlyUpload | None:
    """The early upload's result; None (upload_image sends those chunks, and reports what is
    wrong with them) when there was none or it failed."""
    if early is None:
        return None
    try:
        return await early
    except Exception as e:
        log.warning("the weights' early upload failed, they go up with the image: %s", e)
        return None


async def _catalog(ctx: Context, cmd: FreezeCommand, a: Attempt) -> tuple[CatalogEntry, bool]:
    """Write the entry: (the key's entry, True) once it is ours. An auto-freeze never overwrites
    one that appeared meanwhile: (that entry, False)."""
    kv = ctx.bus.kv[Bucket.CHECKPOINTS]
    entry = CatalogEntry(
        deployment=a.deployment,
        compat_hash=a.compat_hash,
        checkpoint_id=a.checkpoint_id,
        manifest_key=a.manifest_key,
        created_at=time.time(),
        host=ctx.settings.host_id,
        sizes=dict(a.sizes),
    )
    for _ in range(5):
        found = await lookup_entry(kv, a.deployment, a.compat_hash)
        if found is not None and found[0].checkpoint_id == a.checkpoint_id:
            return found[0], True  # written before a crash
        if found is not None and not cmd.force:
            return found[0], False
        try:
            return await publish_entry(kv, replace(entry, created_at=time.time())), True
        except RetryableError:
            continue
    raise RetryableError(f"catalog {a.deployment}.{a.compat_hash}: contended five times", delay_s=1.0)


async def release_claim(ctx: Context) -> None:
    async with ctx.claim_lock:
        if ctx.held is not None:
            await claims.release(ctx.bus.kv[Bucket.LEASES], ctx.held)
            ctx.held = None


async def _notify(ctx: Context, phase: Phase) -> None:
    if ctx.on_phase is not None:
        await ctx.on_phase(phase)


def _phase_spans(
    start_ns: int, end_ns: int, timings_s: dict[str, float], upload_attrs: dict[str, int]
) -> None:
    """`upload_image` is one call; its measured phases become spans after the fact, laid end to
    end from its start: chunk_hash (scan and hash), upload (new chunks, with bytes), manifest."""
    chunk_ns = int(timings_s.get("chunk_s", 0.0) * 1e9)
    upload_ns = int(timings_s.get("upload_s", 0.0) * 1e9)
    marks = [start_ns, start_ns + chunk_ns, start_ns + chunk_ns + upload_ns, max(end_ns, start_ns)]
    for name, a, b in zip(("chunk_hash", "upload", "manifest"), marks, marks[1:], strict=False):
        span = tracer.start_span(name, start_time=a, attributes=upload_attrs if name == "upload" else None)
        span.end(end_time=max(a, b))
