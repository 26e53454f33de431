"""One deployment as the gateway sees it: its ready replicas, the requests in flight on each, and
the requests held while none can take one.

Least outstanding requests first (ties in turn), an optional per-replica limit, a bounded FIFO of
held requests that is served the moment a replica is ready or a slot frees. No I/O and no awaits:
every change is synchronous, so the request handlers, the KV watch and the traffic reporter see
one consistent picture. A held request is a future the pool completes with its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from snapscale.shared.bus import DeploymentSpec, ReplicaEvent, ReplicaState, TrafficEvent

FAILURE_MEMORY_S = 60.0  # a replica failure this recent is the reason given to held requests
_S = ReplicaState
COMING = frozenset({_S.PENDING, _S.STARTING, _S.RESTORING, _S.RESUMING})  # on their way to ready


class Limits(NamedTuple):
    """The spec's request-path keys (`[deployment.scaling]`)."""

    concurrency: int  # per replica, per gateway; 0: no limit
    queue_size: int
    queue_timeout_s: float


def limits_of(spec: DeploymentSpec) -> Limits:
    """The request-path limits of `spec` (their ranges are the spec's: checked when it is read)."""
    s = spec.scaling
    return Limits(s.concurrency_limit, s.queue_size, s.queue_timeout_s)


DEFAULT_LIMITS = limits_of(DeploymentSpec(name="defaults", command=["-"]))


class DeploymentGone(Exception):
    """The deployment left KV while a request was held for it."""


class Stopping(Exception):
    """The gateway is stopping: held requests are answered now rather than cut off later."""


class Attempt:
    """One try of one request on one replica. `answered` once its response head went to the client
    (no retry after that); `lost` when the replica left before that and the try was called off."""

    __slots__ = ("answered", "lost", "retriable", "task")

    def __init__(self, task: asyncio.Task[Any] | None, retriable: bool) -> None:
        self.task = task
        self.retriable = retriable
        self.answered = False
        self.lost = False


@dataclass(eq=False, slots=True)
class Upstream:
    """A ready replica: where it answers and what it has in flight through this gateway."""

    replica: str
    endpoint: str  # host:port
    base: str  # http://host:port
    outstanding: int = 0
    attempts: set[Attempt] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class Waiter:
    future: asyncio.Future[Upstream]
    avoid: str | None  # a replica this request already failed on (its retry goes elsewhere)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request cannot be served now: the 503's reason line and its Retry-After (seconds)."""

    reason: str
    retry_after_s: int


class Pool:
    def __init__(self, deployment: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.deployment = deployment
        self.limits = limits
        self.deployed = False  # its spec is in KV `deployments`: unknown deployments get a 404
        self.stopping = False  # the gateway stops: nothing more is held
        self.replicas: dict[str, Upstream] = {}
        self._order: list[Upstream] = []  # the ready replicas, in the order ties are broken
        self._turn = 0
        self.waiters: deque[Waiter] = deque()
        self.coming: dict[str, ReplicaState] = {}  # replicas on their way up (not ready yet)
        self.failure: tuple[float, str] | None = None  # (when, why) of the latest failed replica
        self.trace: dict[str, dict[str, str]] = {}  # replica -> trace headers of its scale-up
        self.active = 0  # requests for it inside the gateway now: in flight + held
        self.arrivals = 0  # requests that arrived since the last traffic report
        self.reported_zero = True  # the last report said nothing is in flight (say it once)
        self.activated_at = -math.inf  # monotonic time of the last immediate (activation) report

    # --- taking and giving back a replica --------------------------------------------
    def pick(self, avoid: str | None = None) -> Upstream | None:
        """The replica with the fewest requests in flight and room under the limit (ties in turn)."""
        n = len(self._order)
        if n == 0:
            return None
        limit = self.limits.concurrency
        best: Upstream | None = None
        start = self._turn % n
        for i in range(n):
            up = self._order[(start + i) % n]
            if up.replica == avoid or (limit and up.outstanding >= limit):
                continue
            if best is None or up.outstanding < best.outstanding:
                best = up
                if up.outstanding == 0:
                    break
        if best is not None:
            self._turn += 1
        return best

    def take(self, avoid: str | None = None) -> Upstream | None:
        """A replica for a new request now, or None: then it is held (`hold`). Requests already
        held go first: a newcomer takes a slot only when nobody waits for one."""
        if self.waiters:
            return None
        up = self.pick(avoid)
        if up is not None:
            up.outstanding += 1
        return up

    def hold(self, avoid: str | None = None) -> Waiter | None:
        """Queue a request until a replica can take it; None when the queue is full."""
        if self.stopping:
            raise Stopping(self.deployment)
        if len(self.waiters) >= self.limits.queue_size:
            return None
        w = Waiter(asyncio.get_running_loop().create_future(), avoid)
        self.waiters.append(w)
        self._serve()  # a retry that avoids one replica may be served by another at once
        return w

    def drop(self, w: Waiter) -> None:
        """A held request gave up (timeout, client gone): out of the queue."""
        with contextlib.suppress(ValueError):  # served or dropped already
            self.waiters.remove(w)

    def give_back(self, up: Upstream) -> None:
        """A request on `up` is done: its slot goes to the oldest held request that can use it."""
        up.outstanding -= 1
        if self.waiters:
            self._serve()

    def _serve(self) -> None:
        kept: deque[Waiter] = deque()
        while self.waiters:
            w = self.waiters.popleft()
            if w.future.done():
                continue
            up = self.pick(w.avoid)
            if up is None:
                kept.append(w)
                if w.avoid is None or not self._order:  # no room for anyone: the rest wait too
                    kept.extend(self.waiters)
                    self.waiters.clear()
                continue
            up.outstanding += 1
            w.future.set_result(up)
        self.waiters = kept

    # --- replicas coming and going (from KV `replicas` and the replica events) -----------
    def apply(self, ev: ReplicaEvent, now: float) -> Upstream | None:
        """Fold in a replica's record; returns the replica taken out of service, if one was."""
        if ev.state is ReplicaState.READY and ev.endpoint:
            self.coming.pop(ev.replica, None)
            self.failure = None  # one came up since: an older failure no longer explains a wait
            up = self.replicas.get(ev.replica)
            if up is not None and up.endpoint == ev.endpoint:
                return None
            lost = self._out(ev.replica)  # ready again at another endpoint: the old one is gone
            up = Upstream(ev.replica, ev.endpoint, f"http://{ev.endpoint}")
            self.replicas[ev.replica] = up
            self._order.append(up)
            self._serve()
            return lost
        if ev.state in COMING:  # (again) on its way: its scale-up's trace stays (its event may be first)
            self.coming[ev.replica] = ev.state
            return self._out(ev.replica)
        if ev.state is ReplicaState.FAILED:
            self.failure = (now, ev.reason or "failed")
        return self.lose(ev.replica)

    def lose(self, replica: str) -> Upstream | None:
        """`replica` left service (released, failed, gone from KV): no new requests go to it."""
        self.coming.pop(replica, None)
        self.trace.pop(replica, None)
        return self._out(replica)

    def _out(self, replica: str) -> Upstream | None:
        up = self.replicas.pop(replica, None)
        if up is not None and up in self._order:
            self._order.remove(up)
        return up

    def eject(self, replica: str) -> bool:
        """`replica` refused a connection though its record says ready (a host gone, a process
        dead): no new request goes to it until `readmit`, or until its record says more."""
        up = self.replicas.get(replica)
        if up is None or up not in self._order:
            return False
        self._order.remove(up)
        return True

    def readmit(self, replica: str) -> None:
        up = self.replicas.get(replica)
        if up is not None and up not in self._order:
            self._order.append(up)
            self._serve()

    def undeploy(self) -> None:
        """The spec left KV: held requests are answered with `DeploymentGone`."""
        self.deployed = False
        waiters, self.waiters = self.waiters, deque()
        for w in waiters:
            if not w.future.done():
                w.future.set_exception(DeploymentGone(self.deployment))

    def stop(self) -> None:
        """The gateway stops: nothing more is held, and what is held is answered with `Stopping`."""
        self.stopping = True
        waiters, self.waiters = self.waiters, deque()
        for w in waiters:
            if not w.future.done():
                w.future.set_exception(Stopping(self.deployment))

    def set_limits(self, limits: Limits) -> None:
        self.limits = limits
        self.deployed = True
        self._serve()  # a higher limit has room for held requests now

    # --- what to tell a request that cannot be served ----------------------------------
    def refusal(self, now: float, *, queue_full: bool) -> Refusal:
        """Why requests wait: what the replicas on their way are doing, or the latest failure."""
        states = set(self.coming.values())
        if states & {ReplicaState.RESTORING, ReplicaState.RESUMING}:
            why, after = "restoring", 1
        elif ReplicaState.STARTING in states:
            why, after = "cold booting", 2
        elif ReplicaState.PENDING in states:
            why, after = "placing a replica", 1
        elif self._order:
            why, after = f"every replica is at its limit of {self.limits.concurrency} requests", 1
        elif self.replicas:
            why, after = "its ready replicas refuse connections", 1
        elif self.failure is not None and now - self.failure[0] < FAILURE_MEMORY_S:
            why, after = f"failed: {self.failure[1]}", 5
        else:
            why, after = "no replica yet (scaling from zero)", 2
        if queue_full:
            held = self.limits.queue_size
            return Refusal(f"deployment {self.deployment}: {why}; {held} requests held already", after)
        return Refusal(
            f"deployment {self.deployment}: {why}; no replica within {self.limits.queue_timeout_s:g}s", after
        )

    # --- traffic reports -----------------------------------------------------------------
    def report(self, source: str, ts: float) -> TrafficEvent | None:
        """The traffic event due now (arrivals since the last one, in flight + held), or None
        when there was nothing since a report that said zero."""
        if self.active == 0 and self.arrivals == 0 and self.reported_zero:
            return None
        ev = TrafficEvent(self.deployment, ts, self.arrivals, float(self.active), source)
        self.arrivals = 0
        self.reported_zero = self.active == 0
        return ev
