"""The one JetStream consumer loop every service runs: a durable pull consumer whose messages are
handled by plain async functions, some at once, kept alive while they run, settled only here.

Why one loop: acks, naks, terms, redelivery and reconnects are where a command gets lost or done
twice, so they are decided once. A handler returns (ack), raises `RetryableError` (nak with its
delay) or raises anything else (term); a message that does not decode is terminated unseen by
the handler, after `refused` (when given) has answered it: the decoder is the door, so nothing
of a refused message reaches the handler, its ledger or a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.msg import Msg
from nats.js import api

from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.messages import M, decode_message
from snapscale.shared.core import telemetry
from snapscale.shared.core.errors import MessageError, RetryableError

log = logging.getLogger(__name__)

Handler = Callable[[M, Msg], Awaitable[None]]
# answers a message the decoder refused (e.g. reports the replica it names failed); its bytes are
# untrusted: read them only through `messages.salvage`
Refused = Callable[[bytes, MessageError], Awaitable[None]]

FETCH_WAIT_S = 1.0  # how long one pull waits for a message: also how soon a stop is noticed
FETCH_RETRY_S = 1.0  # after a fetch failed for a reason other than no message (a reconnect)
MIN_KEEPALIVE_S = 0.2  # never beat faster than this, whatever the ack wait


async def consume(
    bus: Bus,
    subject: str,
    durable: str,
    cls: type[M],
    handler: Handler[M],
    *,
    ack_wait_s: float = 30.0,
    max_deliver: int = 5,
    concurrency: int = 1,
    keepalive: bool = False,
    drain_s: float | None = None,
    stop: asyncio.Event | None = None,
    refused: Refused | None = None,
) -> None:
    """Run a durable pull consumer on `subject` until `stop` is set or the connection is closed.

    Up to `concurrency` messages are handled at once, each on its own task; a message is fetched
    only when a slot is free, so the server never holds more of them waiting on this consumer.
    With `keepalive`, a message whose handler runs is reported in progress every third of
    `ack_wait_s`, so a handler may outlast the ack wait without the message being redelivered.

    A fetch that fails while the connection reconnects (or the server restarts) is retried after
    `FETCH_RETRY_S`: the loop lives as long as the connection does, and ends when it is closed.

    On stop, nothing more is fetched; the messages in flight get `drain_s` to finish (None: as long
    as they take), then are cancelled and left unacked for the server to redeliver. Cancelling the
    loop cancels them the same way. The pull subscription is removed on the way out (left open,
    it makes the connection's drain wait its whole timeout).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    stop = stop or asyncio.Event()
    beat_s = max(ack_wait_s / 3, MIN_KEEPALIVE_S) if keepalive else None
    sub = await bus.js.pull_subscribe(
        subject,
        durable=durable,
        config=api.ConsumerConfig(ack_wait=ack_wait_s, max_deliver=max_deliver),
    )
    stopping = asyncio.ensure_future(stop.wait())
    handling: set[asyncio.Task[None]] = set()
    try:
        while not stopping.done():
            while len(handling) >= concurrency and not stopping.done():  # wait for a free slot
                await asyncio.wait({*handling, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                break
            try:
                msgs = await sub.fetch(1, timeout=FETCH_WAIT_S)
            except TimeoutError:
                continue
            except Exception as e:
                if isinstance(e, nats.errors.ConnectionClosedError) or bus.nc.is_closed or bus.nc.is_draining:
                    break
                log.warning("fetching %s failed (%s); again in %.0fs", subject, e, FETCH_RETRY_S)
                await asyncio.wait({stopping}, timeout=FETCH_RETRY_S)
                continue
            for m in msgs:  # one: fetch(1)
                t = asyncio.create_task(_run(m, cls, handler, beat_s, refused), name=f"handle {m.subject}")
                handling.add(t)
                t.add_done_callback(handling.discard)
        if handling:
            _, left = await asyncio.wait(handling, timeout=drain_s)
            if left:
                log.warning(
                    "%s: %d message(s) still being handled after %.0fs of draining: cancelled, left "
                    "for redelivery",
                    subject,
                    len(left),
                    drain_s,
                )
    finally:
        stopping.cancel()
        for t in handling:
            t.cancel()
        if handling:
            await asyncio.gather(*handling, return_exceptions=True)
        if not bus.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def _run(
    m: Msg, cls: type[M], handler: Handler[M], beat_s: float | None, refused: Refused | None
) -> None:
    if beat_s is None:
        await _handle(m, cls, handler, refused)
        return
    beat = asyncio.create_task(_keep_alive(m, beat_s), name=f"in-progress {m.subject}")
    try:
        await _handle(m, cls, handler, refused)
    finally:
        beat.cancel()


async def _keep_alive(m: Msg, every_s: float) -> None:
    """Tell the server the message is being worked on, until it is settled."""
    while True:
        await asyncio.sleep(every_s)
        if m.is_acked:
            return
        try:
            await m.in_progress()
        except Exception as e:  # NATS reconnecting: the next beat tries again
            log.warning("in-progress for a message on %s failed: %s", m.subject, e)


async def _handle(m: Msg, cls: type[M], handler: Handler[M], refused: Refused | None = None) -> None:
    """Decode, run the handler, settle the message: the one place acks, naks and terms are sent."""
    try:
        decoded = decode_message(m.data, cls)
    except MessageError as e:
        log.error(
            "refused message on %s: %s",
            m.subject,
            e,
            extra={"subject": m.subject, "field": e.field, "reason": e.reason},
        )
        if refused is not None:
            try:
                await refused(m.data, e)
            except Exception:  # answering is a courtesy: the message is terminated either way
                log.exception("answering a refused message on %s failed", m.subject)
        await _settle(m, "terminate", m.term)
        return
    try:
        with telemetry.continued(m.headers):
            await handler(decoded, m)
    except RetryableError as e:
        log.warning("retrying message on %s in %.1fs: %s", m.subject, e.delay_s, e)
        await _settle(m, "nak", functools.partial(m.nak, delay=e.delay_s))
        return
    except Exception:
        log.exception("handler failed on %s; message terminated", m.subject)
        await _settle(m, "terminate", m.term)
        return
    await _settle(m, "ack", m.ack_sync)  # the outcome counts once the server has the ack


async def _settle(m: Msg, what: str, send: Callable[[], Awaitable[object]]) -> None:
    """Send the message's final answer unless the handler sent one itself. One that fails (the
    connection went) is logged: the server redelivers the message after its ack wait."""
    if m.is_acked:
        return
    try:
        await send()
    except Exception as e:
        log.warning("could not %s a message on %s (%s): it comes back after its ack wait", what, m.subject, e)
