"""The freezer service: the bus's consumer loop on `cmd.freeze.<host>`, one freeze at a time, kept
alive while it runs; a command is acked only once its outcome is recorded; drains on stop.

What a freeze does is job.py's; whether to do it is decide.py's. This module is plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from nats.aio.msg import Msg
from opentelemetry.trace import Status, StatusCode

from snapscale.freezer import claims, job
from snapscale.freezer.config import FreezerConfig
from snapscale.freezer.ledger import Ledger, Phase
from snapscale.shared import bus
from snapscale.shared.bus import Bucket, CheckpointEvent, FreezeCommand, Verb
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import MessageError, RetryableError
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import CriuBinary, SandboxRegistry, find_criu, warn_kdat_cache
from snapscale.shared.store import open_store

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)


def event_msg_id(command_id: str) -> str:
    """One event per command: a replayed outcome inside the dedup window is dropped by the stream."""
    return f"freeze-evt-{command_id}"


class Freezer:
    def __init__(
        self,
        settings: Settings,
        b: bus.Bus,
        ctx: job.Context,
        opts: FreezerConfig,
    ) -> None:
        self.settings = settings
        self.bus = b
        self.ctx = ctx
        self.opts = opts
        self.handled = 0

    async def handle(self, cmd: FreezeCommand, msg: Msg) -> None:
        """`bus.consume`'s handler: publish the outcome, record it, then ack."""
        attrs: dict[str, str | bool] = {
            "snapscale.deployment": cmd.deployment,
            "snapscale.replica": cmd.replica,
            "snapscale.command_id": cmd.id,
            "freeze.force": cmd.force,
            "freeze.keep_running": cmd.keep_running,
        }
        with tracer.start_as_current_span("freeze", attributes=attrs) as span:
            done = self.ctx.ledger.outcome(cmd.id)
            if done is not None:
                log.info(
                    "freeze command %s already handled (ok=%s): answering from the ledger", cmd.id, done.ok
                )
                span.set_attribute("freeze.replayed", True)
                await self._announce(done)
                await msg.ack_sync()
                return
            ctx = replace(self.ctx, held=None, claim_lock=asyncio.Lock())
            try:
                async with self._renewing_claim(ctx):
                    event = await job.run(ctx, cmd)
            except RetryableError as e:
                delivered = msg.metadata.num_delivered
                if delivered < self.opts.max_deliver:
                    log.warning(
                        "freeze %s: %s (delivery %d of %d, will retry)",
                        cmd.id,
                        e,
                        delivered,
                        self.opts.max_deliver,
                    )
                    raise
                event = await self._failed(ctx, cmd, f"gave up after {delivered} deliveries: {e}")
            except Exception as e:
                # a permanent store error or a bug: report it, rather than let the command vanish
                log.exception("freeze %s of %s failed", cmd.id, cmd.deployment)
                event = await self._failed(ctx, cmd, f"{type(e).__name__}: {e}")
            span.set_attribute("freeze.ok", event.ok)
            span.set_attribute("freeze.skipped", event.skipped)
            if event.checkpoint_id:
                span.set_attribute("snapscale.checkpoint_id", event.checkpoint_id)
            if not event.ok:
                span.set_status(trace_status_error(event.reason))
            await self._announce(event)
            attempt = self.ctx.ledger.attempt(cmd.id)  # its staging dir goes with it
            self.ctx.ledger.finish(cmd.id, event, attempt.checkpoint_id if attempt else None)
            await msg.ack_sync()
            self.handled += 1
            if self.handled % 100 == 0:  # a long-lived freezer forgets old outcomes too
                self.ctx.ledger.sweep()

    async def refused(self, data: bytes, e: MessageError) -> None:
        """`bus.consume`'s answer to a freeze command the decoder refused: when its deployment and
        id pass their own limits, a failed checkpoint event says why, so a scaler waiting on that
        freeze goes on now. Nothing of it reaches the ledger."""
        ids = bus.salvage(data, FreezeCommand, ("deployment", "id", "replica"))
        if "deployment" not in ids or "id" not in ids:
            return
        await self._announce(
            CheckpointEvent(
                deployment=ids["deployment"],
                host=self.settings.host_id,
                ok=False,
                ts=time.time(),
                command_id=ids["id"],
                replica=ids.get("replica", ""),
                reason=f"freeze command refused: {e.field}: {e.reason}",
            )
        )

    async def _failed(self, ctx: job.Context, cmd: FreezeCommand, reason: str) -> CheckpointEvent:
        await job.release_claim(ctx)
        a = self.ctx.ledger.attempt(cmd.id)
        compat = {"compat": a.compat, "compat_hash": a.compat_hash} if a is not None else {}
        return job.event_for(cmd, self.settings.host_id, ok=False, reason=reason, **compat)

    async def _announce(self, event: CheckpointEvent) -> None:
        await bus.publish(
            self.bus,
            self.bus.subjects.evt_checkpoint(event.deployment),
            event,
            msg_id=event_msg_id(event.command_id or ""),
        )

    @contextlib.asynccontextmanager
    async def _renewing_claim(self, ctx: job.Context) -> AsyncIterator[None]:
        """While the freeze runs, keep its auto-freeze claim fresh (the bus's consumer loop keeps
        the command itself alive)."""

        async def beat() -> None:
            period = max(self.opts.ack_wait_s / 3, 0.2)
            while True:
                await asyncio.sleep(period)
                async with ctx.claim_lock:  # never renew a claim the job is releasing
                    if ctx.held is None:
                        continue
                    try:
                        ctx.held = await claims.renew(
                            self.bus.kv[Bucket.LEASES], ctx.held, now=time.time(), ttl_s=ctx.claim_ttl_s
                        )
                    except RetryableError as e:
                        log.warning("freeze claim %s lost while freezing: %s", ctx.held.key, e)
                        ctx.held = None
                    except Exception as e:
                        log.warning("freeze claim %s not renewed: %s", ctx.held.key, e)

        task = asyncio.create_task(beat(), name="freeze-claim-renewal")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def trace_status_error(reason: str) -> Status:
    return Status(StatusCode.ERROR, (reason.splitlines() or [""])[0][:200])


async def serve(
    settings: Settings,
    opts: FreezerConfig,
    *,
    stop: asyncio.Event,
    criu: CriuBinary | None = None,
    on_phase: Callable[[Phase], Awaitable[None]] | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Run the freezer for `settings.host_id` until `stop` is set, then drain the freeze in flight."""
    settings.require_signing_key()
    criu = criu or find_criu(settings.criu_path)
    warn_kdat_cache()
    b = await bus.open_bus(settings, f"snapscale-freezer-{settings.host_id}", stop=stop)
    try:
        async with open_store(settings.store) as store:
            ledger = Ledger(settings.state_dir)
            removed = ledger.sweep()
            if removed:
                log.info("removed %d staging dirs no attempt can resume: %s", len(removed), removed)
            ctx = job.Context(
                settings=settings,
                bus=b,
                store=store,
                criu=criu,
                ledger=ledger,
                registry=SandboxRegistry(settings.state_dir),
                claim_ttl_s=opts.claim_ttl_s,
                chunk_bytes=opts.chunk_bytes,
                on_phase=on_phase,
            )
            freezer = Freezer(settings, b, ctx, opts)
            subject = b.subjects.cmd(Verb.FREEZE, settings.host_id)
            log.info("freezer for host %s consuming %s", settings.host_id, subject)
            if started is not None:
                started.set()
            # on stop, a freeze in flight gets drain_s to finish, else its message comes back to a later run
            await bus.consume(
                b,
                subject,
                b.subjects.durable("freezer", Verb.FREEZE, settings.host_id),
                FreezeCommand,
                freezer.handle,
                ack_wait_s=opts.ack_wait_s,
                max_deliver=opts.max_deliver,
                concurrency=1,
                keepalive=True,
                drain_s=opts.drain_s,
                stop=stop,
                refused=freezer.refused,
            )
            log.info("freezer for host %s stopped after %d commands", settings.host_id, freezer.handled)
    finally:
        # Not Bus.close(): a drain would wait its timeout on any subscription still open; everything
        # we published was acked by the server, so a plain close loses nothing.
        if not b.nc.is_closed:
            await b.nc.close()
    b.raise_if_lost()  # exit non-zero: a supervisor restarts a freezer that went deaf
