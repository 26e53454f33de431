"""The scaler's in-memory picture: specs, traffic windows, the catalog, hosts, replicas and
capacity promised to commands in flight, with per-deployment indexes.

No I/O: the service feeds it from NATS and reads it to decide. Every change is synchronous,
so a decision and the bookkeeping of what it sent happen with no await in between.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from snapscale.scaler.placement import Reservations
from snapscale.scaler.records import COMING, HOLDING, LIVE, Tracked
from snapscale.scaler.window import Window
from snapscale.shared.bus import (
    DeploymentSpec,
    FreezeRefusal,
    HostHeartbeat,
    ReplicaEvent,
    ReplicaState,
    replica_key,
)

# states only a running restorer process holds (a pending command or a placed resume is still
# on the stream, for whichever process consumes it next)
HELD = frozenset({ReplicaState.STARTING, ReplicaState.RESTORING, ReplicaState.READY, ReplicaState.SUSPENDED})


@dataclass
class Freezing:
    """A freeze asked for before a deployment's last replica goes."""

    command_id: str
    host: str
    deadline: float
    done: bool = False


@dataclass
class View:
    specs: dict[str, DeploymentSpec] = field(default_factory=dict)
    windows: dict[str, Window] = field(default_factory=dict)
    catalog: dict[str, dict[str, str]] = field(default_factory=dict)  # deployment -> compat hash -> ckpt
    hosts: dict[str, HostHeartbeat] = field(default_factory=dict)
    host_seen: dict[str, float] = field(default_factory=dict)  # host -> local wall time of last heartbeat
    host_started: dict[str, float] = field(default_factory=dict)  # host -> its restorer's start (its clock)
    replicas: dict[str, Tracked] = field(default_factory=dict)  # `<deployment>.<replica>` -> tracked
    by_deployment: dict[str, set[str]] = field(default_factory=dict)
    reserved: Reservations = field(default_factory=Reservations)
    held: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # key -> (host, gpus) reserved
    freezing: dict[str, Freezing] = field(default_factory=dict)
    refused: dict[str, dict[str, FreezeRefusal]] = field(default_factory=dict)  # dep -> compat hash -> why
    avoid: dict[tuple[str, str], float] = field(default_factory=dict)  # (deployment, host) -> until
    traffic_headers: dict[str, dict[str, str]] = field(default_factory=dict)  # last traffic's trace headers
    retired: set[str] = field(default_factory=set)  # removed from KV, still releasing replicas

    # --- specs and windows --------------------------------------------------------
    def window(self, deployment: str, now: float) -> Window:
        w = self.windows.get(deployment)
        if w is None:
            w = self.windows[deployment] = Window(self.specs[deployment].scaling, now)
        return w

    def put_spec(self, spec: DeploymentSpec, now: float) -> None:
        old = self.specs.get(spec.name)
        self.specs[spec.name] = spec
        self.retired.discard(spec.name)
        if old is not None and (
            old.scaling.stable_window_s != spec.scaling.stable_window_s
            or old.scaling.panic_window_s != spec.scaling.panic_window_s
        ):
            # new window lengths: start over, keeping the restart rule (no scale-down for a window)
            self.windows.pop(spec.name, None)
        self.window(spec.name, now)

    def set_refusal(self, deployment: str, compat_hash: str, r: FreezeRefusal | None) -> None:
        if r is not None:
            self.refused.setdefault(deployment, {})[compat_hash] = r
        else:
            self.refused.get(deployment, {}).pop(compat_hash, None)

    def retire(self, deployment: str, now: float) -> None:
        """The deployment left KV: stop what it has, suspended replicas too (no freeze, no
        prefetch, no suspend), then forget it. Replicas of a deployment with no spec at all (removed
        while no scaler ran) are retired under a stand-in spec that only drains."""
        spec = self.specs.get(deployment) or DeploymentSpec(name=deployment, command=["(removed)"])
        if not any(t.ev.state in HOLDING for t in self.of(deployment)):
            self.forget(deployment)
            return
        self.retired.add(deployment)
        self.specs[deployment] = replace(
            spec,
            scaling=replace(
                spec.scaling, min_replicas=0, max_replicas=0, scale_to_zero_after_s=0.0, release_mode="stop"
            ),
        )
        self.window(deployment, now).observed_since = -math.inf  # no restart hold: nothing should stay

    def forget(self, deployment: str) -> None:
        self.specs.pop(deployment, None)
        self.windows.pop(deployment, None)
        self.retired.discard(deployment)
        self.freezing.pop(deployment, None)
        self.traffic_headers.pop(deployment, None)

    # --- replicas -------------------------------------------------------------------
    def track(self, t: Tracked) -> None:
        self.replicas[t.key] = t
        self.by_deployment.setdefault(t.ev.deployment, set()).add(t.key)

    def drop(self, key: str) -> Tracked | None:
        t = self.replicas.pop(key, None)
        if t is not None:
            self.by_deployment.get(t.ev.deployment, set()).discard(key)
            self.unhold(key)
        return t

    def of(self, deployment: str) -> Iterator[Tracked]:
        for k in self.by_deployment.get(deployment, ()):
            t = self.replicas.get(k)
            if t is not None:
                yield t

    def live(self, deployment: str) -> list[Tracked]:
        return [t for t in self.of(deployment) if t.ev.state in LIVE]

    def suspended(self, deployment: str) -> list[Tracked]:
        return [t for t in self.of(deployment) if t.ev.state is ReplicaState.SUSPENDED]

    def live_count(self, deployment: str) -> int:
        return sum(1 for t in self.of(deployment) if t.ev.state in LIVE)

    def ready(self, deployment: str) -> list[ReplicaEvent]:
        return [t.ev for t in self.of(deployment) if t.ev.state is ReplicaState.READY]

    def coming(self) -> list[Tracked]:
        return [t for t in self.replicas.values() if t.ev.state in COMING]

    def replicas_on(self, deployment: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.live(deployment):
            out[t.ev.host] = out.get(t.ev.host, 0) + 1
        return out

    # --- capacity promised to commands in flight -------------------------------------
    def hold(self, key: str, host: str, gpus: list[str]) -> None:
        self.held[key] = (host, list(gpus))

    def unhold(self, key: str) -> None:
        got = self.held.pop(key, None)
        if got is not None:
            host, gpus = got
            self.reserved.give_back(host, gpus, key.split(".", 1)[1])

    def heartbeat(self, hb: HostHeartbeat, now: float) -> list[Tracked]:
        """A host reported: what it lists no longer needs a promise (its own flags cover it).

        When its restorer started anew since the last report, returns `gone_from(hb)`, to be
        failed and replaced now. Failures the restart caused say nothing about the deployment: the
        host is no longer avoided for any.
        """
        self.hosts[hb.host] = hb
        self.host_seen[hb.host] = now
        listed = {replica_key(r.deployment, r.replica) for r in hb.replicas}
        for key in [k for k, (h, _g) in self.held.items() if h == hb.host and k in listed]:
            self.unhold(key)
        if self.host_started.get(hb.host) == hb.started_at:
            return []
        self.host_started[hb.host] = hb.started_at
        for k in [k for k in self.avoid if k[1] == hb.host]:
            del self.avoid[k]
        return self.gone_from(hb)

    def gone_from(self, hb: HostHeartbeat) -> list[Tracked]:
        """The replicas this view has on `hb.host` from before its restorer started that `hb` does
        not list: gone with an old process. A command still on its way there (pending, or a resume
        the scaler placed) is not: whichever process consumes it next takes it."""
        listed = {replica_key(r.deployment, r.replica) for r in hb.replicas}
        return [
            t
            for t in self.replicas.values()
            if t.ev.host == hb.host and t.key not in listed and t.ev.state in HELD and t.ev.ts < hb.started_at
        ]

    def cut_by_restart(self, t: Tracked, ev: ReplicaEvent) -> bool:
        """`ev` (failed) came from the restarted restorer of a replica its old process had: the
        restart's doing, not the deployment's."""
        started = self.host_started.get(ev.host)
        return started is not None and t.ev.ts < started <= ev.ts

    def avoided(self, deployment: str, now: float) -> frozenset[str]:
        return frozenset(h for (d, h), until in self.avoid.items() if d == deployment and until > now)
