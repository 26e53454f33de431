"""What `bench/e2e_gpu.py` measured, as rows, ratios and a printed table.

Pure: measurements in, plain dicts and text out. No I/O, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapscale.restorer.scaleup import ENGINE_PHASES
from snapscale.shared.core import tables

# The phases a ready event's timings_s can carry, in the order they run (docs/restorer.md).
PHASE_ORDER = ("lookup", "prefetch", "materialize", "launch", *ENGINE_PHASES, "total")


@dataclass
class Up:
    """One scale-up as the bench saw it: from the first traffic event of its step to the first
    answer of the replica, compared byte for byte with the cold-booted replica's."""

    step: str
    tier: str
    replica: str
    to_ready_event_s: float  # first traffic event -> ready event (its ts)
    to_first_answer_s: float  # first traffic event -> first correct answer received
    answer_identical: bool
    phases_s: dict[str, float] = field(default_factory=dict)  # the ready event's timings_s
    bytes: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def to_plain(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tier": self.tier,
            "replica": self.replica,
            "to_ready_event_s": round(self.to_ready_event_s, 3),
            "to_first_answer_s": round(self.to_first_answer_s, 3),
            "answer_identical": self.answer_identical,
            "phases_s": dict(self.phases_s),
            "bytes": dict(self.bytes),
            "reason": self.reason,
        }


@dataclass
class Raw:
    """`engine.restore` alone on the same checkpoint's image (materialized by the bench first)."""

    to_first_answer_s: float  # engine.restore start -> first correct answer
    timings_s: dict[str, float]
    materialize_s: float  # not counted above: the image was on disk before the clock started
    answer_identical: bool


def ratios(ups: list[Up], raw: Raw | None) -> dict[str, float]:
    """cold/<tier> for every later scale-up, and <restore>/raw with the control plane's overhead."""
    out: dict[str, float] = {}
    cold = next((u for u in ups if u.tier == "cold"), None)
    for i, u in enumerate(ups):
        if u is cold or u.to_first_answer_s <= 0:
            continue
        name = f"{i + 1}_{u.tier}"
        if cold is not None:
            out[f"cold_over_{name}"] = round(cold.to_first_answer_s / u.to_first_answer_s, 2)
        if u.tier in ("store", "cache"):
            # the same restore's own engine steps: what is left is the control plane's
            engine_s = sum(u.phases_s.get(k, 0.0) for k in ENGINE_PHASES)
            out[f"{name}_minus_own_engine_s"] = round(u.to_first_answer_s - engine_s, 3)
        if raw is not None and u.tier in ("store", "cache") and raw.to_first_answer_s > 0:
            out[f"{name}_over_raw"] = round(u.to_first_answer_s / raw.to_first_answer_s, 2)
            out[f"{name}_overhead_s"] = round(u.to_first_answer_s - raw.to_first_answer_s, 3)
    return out


def phases_line(phases: dict[str, float]) -> str:
    known = [k for k in PHASE_ORDER if k in phases]
    rest = sorted(k for k in phases if k not in PHASE_ORDER)
    return "  ".join(f"{k} {phases[k]:.2f}" for k in known + rest)


def table(ups: list[Up], raw: Raw | None, image_bytes: int) -> str:
    head = ("#", "step", "tier", "to ready", "1st answer", "same", "phases (s)")
    rows: list[tuple[str, ...]] = []
    for i, u in enumerate(ups):
        rows.append((str(i + 1), u.step, u.tier, f"{u.to_ready_event_s:.2f}s", f"{u.to_first_answer_s:.2f}s",
                     "yes" if u.answer_identical else "NO", phases_line(u.phases_s)))  # fmt: skip
    if raw is not None:
        rows.append(("-", "engine.restore alone", "raw", "", f"{raw.to_first_answer_s:.2f}s",
                     "yes" if raw.answer_identical else "NO", phases_line(raw.timings_s)))  # fmt: skip
    lines = [tables.table(head, rows)]
    lines.append(f"image: {image_bytes / 2**30:.2f} GiB")
    for k, v in ratios(ups, raw).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)
