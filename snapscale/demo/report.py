"""What `snapscale demo` saw, folded from replica and checkpoint events, and how it prints it.

Pure: events in, a state and text/JSON out. No I/O, no clocks (times arrive as arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapscale.shared.bus import CheckpointEvent, HostHeartbeat, ReplicaEvent, ReplicaState, Tier
from snapscale.shared.core import tables

_COMING_UP = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.RESTORING, ReplicaState.RESUMING)
_GONE = (ReplicaState.STOPPED, ReplicaState.SUSPENDED, ReplicaState.FAILED)


@dataclass
class ScaleUp:
    """One replica brought up: from the traffic that asked for it to its ready event."""

    step: str  # the scenario step that caused it ("from zero", "after scale to zero", ...)
    replica: str
    requested_at: float  # unix seconds of the first traffic event of the step
    tier: Tier | None = None
    ready_at: float | None = None
    reason: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    checkpoint_id: str | None = None
    endpoint: str = ""
    states: list[str] = field(default_factory=list)
    failed: str = ""
    answer: str = ""  # the first answer to the demo's request through the gateway
    # what a user felt: the step's first request sent through the gateway -> its answer received
    first_request_at: float | None = None
    first_answer_at: float | None = None

    @property
    def time_to_ready_s(self) -> float | None:
        if self.ready_at is None:
            return None
        return max(0.0, self.ready_at - self.requested_at)

    @property
    def time_to_first_answer_s(self) -> float | None:
        if self.first_request_at is None or self.first_answer_at is None:
            return None
        return max(0.0, self.first_answer_at - self.first_request_at)

    def to_plain(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "replica": self.replica,
            "tier": self.tier.value if self.tier else None,
            "time_to_ready_s": None if self.time_to_ready_s is None else round(self.time_to_ready_s, 3),
            "time_to_first_answer_s": _round(self.time_to_first_answer_s),
            "reason": self.reason,
            "timings_s": dict(self.timings_s),
            "bytes": dict(self.bytes),
            "checkpoint_id": self.checkpoint_id,
            "endpoint": self.endpoint,
            "states": list(self.states),
            "failed": self.failed,
            "answer": self.answer,
        }


@dataclass
class DemoState:
    """The replicas and checkpoints of one deployment as the demo follows them."""

    deployment: str
    step: str = "starting"
    step_started_at: float = 0.0
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    scale_ups: list[ScaleUp] = field(default_factory=list)
    checkpoints: list[CheckpointEvent] = field(default_factory=list)
    hosts: dict[str, HostHeartbeat] = field(default_factory=dict)

    def begin_step(self, step: str, now: float) -> None:
        self.step = step
        self.step_started_at = now

    def apply_replica(self, ev: ReplicaEvent) -> ScaleUp | None:
        """Fold one replica event in; returns the scale-up it completed, if it did."""
        if ev.deployment != self.deployment:
            return None
        prev = self.replicas.get(ev.replica)
        self.replicas[ev.replica] = ev.state
        current = self._open(ev.replica)
        if ev.state in _COMING_UP and current is None and prev not in _COMING_UP:
            current = ScaleUp(step=self.step, replica=ev.replica, requested_at=self.step_started_at)
            self.scale_ups.append(current)
        if current is None:
            return None
        current.states.append(ev.state.value)
        if ev.tier is not None:
            current.tier = ev.tier
        if ev.reason:
            current.reason = ev.reason
        if ev.state is ReplicaState.READY:
            current.ready_at = ev.ts
            current.timings_s = dict(ev.timings_s)
            current.bytes = dict(ev.bytes)
            current.checkpoint_id = ev.checkpoint_id
            current.endpoint = ev.endpoint
            return current
        if ev.state is ReplicaState.FAILED:
            current.failed = ev.reason or "failed"
        return None

    def apply_checkpoint(self, ev: CheckpointEvent) -> None:
        if ev.deployment == self.deployment:
            self.checkpoints.append(ev)

    def apply_host(self, hb: HostHeartbeat) -> None:
        self.hosts[hb.host] = hb

    def cached_on(self, host: str, checkpoint_id: str) -> bool:
        """The host's last heartbeat lists the checkpoint as fully in its cache."""
        hb = self.hosts.get(host)
        return hb is not None and checkpoint_id in hb.cached_checkpoints

    def _open(self, replica: str) -> ScaleUp | None:
        for s in reversed(self.scale_ups):
            if s.replica == replica and s.ready_at is None and not s.failed:
                return s
        return None

    # --- queries the scenario waits on ----------------------------------------------
    def ready(self) -> list[str]:
        return sorted(r for r, s in self.replicas.items() if s is ReplicaState.READY)

    def live(self) -> list[str]:
        return sorted(r for r, s in self.replicas.items() if s not in _GONE)

    def suspended(self) -> list[str]:
        return sorted(r for r, s in self.replicas.items() if s is ReplicaState.SUSPENDED)

    def frozen(self) -> CheckpointEvent | None:
        # A skipped freeze (the key already had a checkpoint) names that checkpoint without sizes.
        ok = [c for c in self.checkpoints if c.ok and c.checkpoint_id and not c.skipped]
        return ok[-1] if ok else None

    def ready_in_step(self, step: str) -> list[ScaleUp]:
        return [s for s in self.scale_ups if s.step == step and s.ready_at is not None]

    def status_line(self, now: float) -> str:
        """One line for the terminal: the step, its clock, and every replica's state."""
        reps = ", ".join(f"{r}={s.value}" for r, s in sorted(self.replicas.items())) or "no replicas"
        ck = self.frozen()
        ckpt = f" | checkpoint {ck.checkpoint_id}" if ck else ""
        return f"[{now - self.step_started_at:6.1f}s] {self.step}: {reps}{ckpt}"


_RESTORES = (Tier.STORE, Tier.CACHE)


def cold_restore_ratio(scale_ups: list[ScaleUp], tiers: tuple[Tier, ...] = _RESTORES) -> float | None:
    """Cold-boot time to ready over the fastest of `tiers` (restores); None without one of each.
    From the times as the report gives them (ms), so the ratio is the one its numbers show."""
    shown = [(s.tier, _round(s.time_to_ready_s)) for s in scale_ups]
    cold = [t for tier, t in shown if tier is Tier.COLD and t]
    fast = [t for tier, t in shown if tier in tiers and t]
    if not cold or not fast:
        return None
    return min(cold) / min(fast)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _fmt_phases(timings_s: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2f}s" for k, v in timings_s.items())


def table(scale_ups: list[ScaleUp]) -> str:
    """The scale-ups as an aligned text table, then the reason each did not take a faster tier."""
    head = ("#", "scale-up", "replica", "tier", "to ready", "first answer", "phases")
    rows = [
        (
            str(i),
            s.step,
            s.replica,
            s.tier.value if s.tier else "-",
            f"{s.time_to_ready_s:.2f}s" if s.time_to_ready_s is not None else (s.failed or "not ready"),
            f"{s.time_to_first_answer_s:.2f}s" if s.time_to_first_answer_s is not None else "-",
            _fmt_phases(s.timings_s),
        )
        for i, s in enumerate(scale_ups, 1)
    ]
    out = [tables.table(head, rows, rule=True)]
    reasons = [(i, s.reason) for i, s in enumerate(scale_ups, 1) if s.reason]
    out += [f"  #{i}: {reason}" for i, reason in reasons]
    return "\n".join(out)


def summary(state: DemoState) -> str:
    parts = [table(state.scale_ups)]
    ck = state.frozen()
    if ck is not None:
        sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in ck.sizes.items())
        parts.append(f"checkpoint {ck.checkpoint_id}: {sizes}; freeze {_fmt_phases(ck.timings_s)}")
    ratio = cold_restore_ratio(state.scale_ups)
    if ratio is not None:
        parts.append(f"cold boot / restore: {ratio:.1f}x")
    resume = cold_restore_ratio(state.scale_ups, (Tier.RESUME,))
    if resume is not None:
        parts.append(f"cold boot / resume: {resume:.1f}x")
    return "\n".join(parts)


def cleanup_lines(stopped: list[str], killed: int, netns: list[str], left: list[int]) -> list[str]:
    """What the cleanup did, for a reader who wants to know that nothing leaked. `stopped`: the
    replicas still serving when the scenario ended (the demo does not wait for the last scale to
    zero, and the restorer leaves its sandboxes running when it stops, for its next start to
    adopt); `killed`: their processes; `left`: what still runs from the work dir afterwards."""
    out = []
    if killed:
        who = f"replica {', '.join(stopped)}" if stopped else "a sandbox"
        nets = f", and deleted its network namespace {', '.join(netns)}" if netns else ""
        noun = "process" if killed == 1 else "processes"
        out.append(f"stopped {who}, still serving at the end ({killed} {noun}){nets}")
    if left:
        out.append(f"still running from the demo's work dir: PIDs {', '.join(map(str, left))}")
    else:
        out.append("nothing the demo started is left running")
    return out


def to_plain(state: DemoState, **extra: Any) -> dict[str, Any]:
    """The results as JSON-ready data (`--json`)."""
    ck = state.frozen()
    return {
        "deployment": state.deployment,
        "scale_ups": [s.to_plain() for s in state.scale_ups],
        "cold_restore_ratio": cold_restore_ratio(state.scale_ups),
        "cold_resume_ratio": cold_restore_ratio(state.scale_ups, (Tier.RESUME,)),
        "checkpoint": None
        if ck is None
        else {
            "checkpoint_id": ck.checkpoint_id,
            "sizes": dict(ck.sizes),
            "timings_s": dict(ck.timings_s),
            "compat_hash": ck.compat_hash,
        },
        **extra,
    }
