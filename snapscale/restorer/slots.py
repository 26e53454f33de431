"""This host's GPUs and CPU slots, and which replica holds which: in-memory reservations.

Pure bookkeeping: the service reserves before it starts a sandbox and frees after it stops one.
No I/O, no NVML here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from snapscale.shared.bus import GpuInfo
from snapscale.shared.core.errors import SnapscaleError


class NoCapacityError(SnapscaleError):
    """The host has no free GPU (or CPU slot) for the replica; the message says what is taken."""


@dataclass(frozen=True)
class Grant:
    replica: str
    gpu_uuids: tuple[str, ...] = ()
    cpu_slot: bool = False


@dataclass
class Slots:
    """GPU and CPU-slot reservations by replica. A CPU deployment takes one CPU slot."""

    gpus: list[GpuInfo]
    cpu_slots: int
    held: dict[str, Grant] = field(default_factory=dict)

    def free_gpus(self) -> list[str]:
        taken = {u for g in self.held.values() for u in g.gpu_uuids}
        return [g.uuid for g in self.gpus if g.uuid not in taken]

    def free_cpu_slots(self) -> int:
        return self.cpu_slots - sum(1 for g in self.held.values() if g.cpu_slot)

    def reserve(self, replica: str, gpus: int, wanted: list[str] | None = None) -> Grant:
        """Reserve `gpus` GPUs (the `wanted` ones when given) or, for 0, one CPU slot.

        Reserving again for a replica that already holds a grant returns that grant.
        """
        if replica in self.held:
            return self.held[replica]
        if gpus <= 0:
            if self.free_cpu_slots() <= 0:
                raise NoCapacityError(f"no free CPU slot ({self.cpu_slots} of {self.cpu_slots} in use)")
            grant = Grant(replica, (), cpu_slot=True)
        else:
            free = self.free_gpus()
            if wanted:
                unknown = [u for u in wanted if u not in {g.uuid for g in self.gpus}]
                busy = [u for u in wanted if u not in free and u not in unknown]
                if unknown or busy:
                    raise NoCapacityError(
                        f"GPUs asked for are not free here (unknown: {unknown or '-'}, in use: {busy or '-'})"
                    )
                if len(wanted) != gpus:
                    raise NoCapacityError(f"the command names {len(wanted)} GPUs, the spec needs {gpus}")
                chosen = list(wanted)
            else:
                if len(free) < gpus:
                    raise NoCapacityError(f"needs {gpus} GPUs, {len(free)} of {len(self.gpus)} free")
                chosen = free[:gpus]
            grant = Grant(replica, tuple(chosen))
        self.held[replica] = grant
        return grant

    def adopt(self, grant: Grant) -> None:
        """Record a grant found at start (a sandbox re-adopted), whatever the free counts say."""
        self.held[grant.replica] = grant

    def rename(self, old: str, new: str) -> None:
        if old in self.held:
            self.held[new] = replace(self.held.pop(old), replica=new)

    def free(self, replica: str) -> Grant | None:
        return self.held.pop(replica, None)

    def gpu_view(self) -> list[GpuInfo]:
        free = set(self.free_gpus())
        return [replace(g, free=g.uuid in free) for g in self.gpus]
