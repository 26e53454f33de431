"""A host arena: an address range reserved once, whose memory can be given back and mapped again at
the same addresses. The CPU counterpart of `vmm.CudaArena` (same methods), so a CPU sandbox runs the
weights path end to end under CRIU: a released range is a PROT_NONE mapping with no pages, which
CRIU records as an empty area and a restore recreates at the same address. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

from snapscale.workload.errors import WeightsError
from snapscale.workload.record import round_up

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    c = ctypes
    lib.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


class HostArena:
    """`size` bytes of address space in this process; `map` backs them with fresh zeroed pages,
    `release` gives the pages back and keeps the range reserved (PROT_NONE)."""

    kind = "host"

    def __init__(self, size: int) -> None:
        self._libc = _libc()
        self.size = round_up(max(size, 1), mmap.PAGESIZE)
        self.device = "cpu"
        self.va = self._mmap(None, _PROT_NONE, _MAP_NORESERVE, "reserve")
        self.mapped = False

    def _mmap(self, at: int | None, prot: int, flags: int, what: str) -> int:
        flags |= mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_MAP_FIXED if at is not None else 0)
        got = self._libc.mmap(at, self.size, prot, flags, -1, 0)
        if got is None or got == _MAP_FAILED or (at is not None and got != at):
            err = ctypes.get_errno()
            raise WeightsError(f"arena {what}", f"mmap of {self.size} bytes failed: {os.strerror(err)}")
        return int(got)

    def map(self) -> None:
        """Fresh zero pages over the whole range, at the same addresses."""
        self._mmap(self.va, mmap.PROT_READ | mmap.PROT_WRITE, 0, "map")
        self.mapped = True

    def release(self) -> None:
        """Give the pages back; the range stays reserved (touching it faults until `map`)."""
        self._mmap(self.va, _PROT_NONE, _MAP_NORESERVE, "release")
        self.mapped = False

    def close(self) -> None:
        self._libc.munmap(self.va, self.size)
        self.mapped = False


class HostDest:
    """A fill's destination in a host arena: reads land in the arena itself (`in_place`), or, with
    `staged`, in staging buffers copied over afterwards, the way a device is filled (tests run the
    staged pipeline on it without a GPU)."""

    def __init__(self, arena: HostArena, *, staged: bool = False) -> None:
        self.arena = arena
        self.in_place = not staged
        self._bufs: list[bytearray] = []

    def direct(self, dst: int, n: int) -> memoryview:
        return memoryview((ctypes.c_char * n).from_address(self.arena.va + dst)).cast("B")

    def staging(self, count: int, size: int) -> list[memoryview]:
        self._bufs = [bytearray(size) for _ in range(count)]
        return [memoryview(b) for b in self._bufs]

    def copy(self, dst: int, buf: int, n: int) -> None:
        src = (ctypes.c_char * n).from_buffer(self._bufs[buf])
        ctypes.memmove(self.arena.va + dst, src, n)

    def wait(self, buf: int) -> None:
        pass  # copies here are synchronous

    def zero(self, dst: int, n: int) -> None:
        ctypes.memset(self.arena.va + dst, 0, n)

    def finish(self) -> None:
        self._bufs = []
