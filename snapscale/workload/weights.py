"""Weights a workload can give back before a freeze and get back after a restore, at the same
addresses, so compiled kernels and CUDA graphs captured at boot keep reading the right memory.

`Weights.load(path, device)` reads a safetensors file into an arena (GPU memory in a reserved CUDA
VMM range, or a reserved host range on CPU), hashing each tensor's chunks on the way, and hands out
the tensors. `release()` returns the record (which chunks back which tensor) and gives the memory
back, keeping the addresses; the CUDA checkpoint and CRIU then carry everything but the weights.
`restore(source)` maps memory at the same addresses and fills it from the host cache's chunk files,
from the source files, or maps memory a host process filled (`FdHandover`). Needs torch.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

from snapscale.workload import fill as filling
from snapscale.workload import record as rec
from snapscale.workload.arena import HostArena, HostDest
from snapscale.workload.errors import WeightsError
from snapscale.workload.handover import receive
from snapscale.workload.hooks import ChunkDir, FdHandover, FillSource, SourceFiles
from snapscale.workload.stfile import read_layout
from snapscale.workload.vmm import CudaArena, Vmm

_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
    "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
}  # fmt: skip

Arena = HostArena | CudaArena


class _Cai:
    """A device range as `__cuda_array_interface__`, for `torch.as_tensor` to view without copying."""

    def __init__(self, va: int, size: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (va, False),
            "version": 3,
        }


class CudaDest:
    """A fill's destination in a CUDA arena: staging buffers pinned for the fill only, copies on a
    side stream, one event a buffer so a buffer is reused only once its copy is done.

    The buffers are a host range of our own, registered with CUDA and unmapped when the fill ends:
    pinned memory from torch's allocator would stay cached in the process after it, and go into
    the next image."""

    in_place = False

    def __init__(self, torch: Any, flat: Any) -> None:
        self.torch = torch
        self.flat = flat
        self.stream = torch.cuda.Stream(device=flat.device)
        self._host: HostArena | None = None
        self._bufs: list[Any] = []
        self._events: list[Any] = []

    def direct(self, dst: int, n: int) -> memoryview:
        raise WeightsError("fill", "GPU memory is not readable from the host")

    def staging(self, count: int, size: int) -> list[memoryview]:
        t = self.torch
        host = HostArena(count * size)
        host.map()
        code = int(t.cuda.cudart().cudaHostRegister(host.va, host.size, 0))
        if code != 0:
            host.close()
            raise WeightsError("fill", f"cudaHostRegister of {host.size} staging bytes failed: error {code}")
        self._host = host
        addrs = [host.va + i * size for i in range(count)]
        self._bufs = [t.frombuffer((ctypes.c_uint8 * size).from_address(a), dtype=t.uint8) for a in addrs]
        self._events = [t.cuda.Event() for _ in range(count)]
        return [memoryview((ctypes.c_char * size).from_address(a)).cast("B") for a in addrs]

    def copy(self, dst: int, buf: int, n: int) -> None:
        with self.torch.cuda.stream(self.stream):
            self.flat[dst : dst + n].copy_(self._bufs[buf][:n], non_blocking=True)
            self._events[buf].record(self.stream)

    def wait(self, buf: int) -> None:
        self._events[buf].synchronize()

    def zero(self, dst: int, n: int) -> None:
        with self.torch.cuda.stream(self.stream):
            self.flat[dst : dst + n].zero_()

    def finish(self) -> None:
        self.stream.synchronize()
        self._bufs, self._events = [], []
        if self._host is not None:
            self.torch.cuda.cudart().cudaHostUnregister(self._host.va)
            self._host.close()
            self._host = None


def _new_arena(torch: Any, device: str, size: int) -> Arena:
    if device == "cpu":
        return HostArena(size)
    if not device.startswith("cuda"):
        raise WeightsError("device", f"{device!r}: weights go to 'cpu' or 'cuda[:N]'")
    vmm = Vmm.load()  # no CUDA here: refuse before torch tries
    torch.cuda.init()
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    torch.cuda.set_device(index)  # the driver calls below run in this device's primary context
    return CudaArena(vmm, index, size)


def _flat(torch: Any, arena: Arena) -> Any:
    """The whole arena as one uint8 tensor; valid across release and map (the addresses stay)."""
    if isinstance(arena, HostArena):
        return torch.frombuffer((ctypes.c_uint8 * arena.size).from_address(arena.va), dtype=torch.uint8)
    return torch.as_tensor(_Cai(arena.va, arena.size), device=arena.device)


class Weights:
    """Tensors in one arena, with the record that says how to fill it again."""

    def __init__(self, torch: Any, arena: Arena, record: rec.WeightsRecord, threads: int) -> None:
        self.torch = torch
        self.arena = arena
        self.record = record
        self.threads = threads
        self.flat = _flat(torch, arena)
        self.tensors: dict[str, Any] = {
            t.name: self.flat[t.offset : t.offset + t.nbytes]
            .view(getattr(torch, _TORCH_DTYPES[t.dtype]))
            .view(t.shape)
            for t in record.tensors
        }
        self.timings: dict[str, float] = {}

    @property
    def released(self) -> bool:
        return not self.arena.mapped

    @classmethod
    def load(
        cls,
        path: str,
        device: str = "cuda",
        *,
        chunk_bytes: int = rec.DEFAULT_CHUNK_BYTES,
        threads: int = filling.DEFAULT_THREADS,
    ) -> Weights:
        """Every tensor of the safetensors file at `path`, in a new arena on `device`."""
        import torch

        if chunk_bytes <= 0:
            raise WeightsError("chunk_bytes", f"must be positive, got {chunk_bytes}")
        t0 = time.monotonic()
        path = os.path.abspath(path)
        layout = read_layout(path)
        offsets, span = rec.layout([t.nbytes for t in layout])
        arena = _new_arena(torch, device, span)
        arena.map()
        segs, owner = [], []
        for k, (t, off) in enumerate(zip(layout, offsets, strict=True)):
            for o, n in rec.pieces(t.nbytes, chunk_bytes):
                segs.append(rec.Segment(off + o, n, path, t.start + o))
                owner.append(k)
        try:
            rep = filling.fill(_dest(torch, arena, _flat(torch, arena)), segs, threads=threads, hashing=True)
        except BaseException:
            arena.close()
            raise
        chunks: list[list[str]] = [[] for _ in layout]
        for k, d in zip(owner, rep.digests, strict=True):
            assert d is not None
            chunks[k].append(d)
        record = rec.WeightsRecord(
            format=rec.FORMAT,
            chunk_bytes=chunk_bytes,
            arena=rec.ArenaInfo(arena.kind, arena.device, arena.va, arena.size),
            files=(rec.SourceFile(path, os.stat(path).st_size),),
            tensors=tuple(
                rec.TensorEntry(t.name, t.dtype, t.shape, off, t.nbytes, 0, t.start, tuple(chunks[k]))
                for k, (t, off) in enumerate(zip(layout, offsets, strict=True))
            ),
        )
        rec.check(record)
        w = cls(torch, arena, record, threads)
        w.timings.update(load_s=round(time.monotonic() - t0, 4), load_gbps=round(rep.gbps, 2))
        return w

    def _sync(self) -> None:
        if isinstance(self.arena, CudaArena):
            self.torch.cuda.synchronize(self.arena.index)

    def release(self) -> rec.WeightsRecord:
        """Give the weights' memory back, keep their addresses; the record says how to refill."""
        if self.released:
            raise WeightsError("release", "the weights are released already")
        t0 = time.monotonic()
        self._sync()  # no kernel may still read them
        self.arena.release()
        self.timings["release_s"] = round(time.monotonic() - t0, 4)
        return self.record

    def restore(self, source: FillSource | None = None) -> filling.FillReport:
        """Map memory at the same addresses and fill it from `source` (default: the source files,
        verified). On failure the weights stay released, so a second call may try again."""
        if not self.released:
            raise WeightsError("restore", "the weights are mapped: release them first")
        t0 = time.monotonic()
        source = SourceFiles() if source is None else source
        if isinstance(source, FdHandover):
            try:
                self._map_handed_over(source.socket)
            except WeightsError as e:
                if source.fallback is None:
                    raise
                # the host filler failed: this restore still serves, from the chunk files
                print(f"snapscale.workload: fd handover failed ({e}); filling from {source.fallback}",
                      file=sys.stderr, flush=True)  # fmt: skip
                self.timings["handover_failed"] = 1.0
                return self.restore(ChunkDir(source.fallback))
            rep = filling.FillReport(0, time.monotonic() - t0, [])
        else:
            self.arena.map()
            try:
                if isinstance(source, ChunkDir):
                    plan = rec.chunk_plan(self.record, lambda d: os.path.join(source.dir, d))
                else:
                    plan = rec.file_plan(self.record, verify=source.verify)
                rep = filling.fill(_dest(self.torch, self.arena, self.flat), plan, threads=self.threads)
            except BaseException:
                self.arena.release()
                raise
        self.timings.update(restore_s=round(time.monotonic() - t0, 4), restore_gbps=round(rep.gbps, 2))
        return rep

    def _map_handed_over(self, path: str) -> None:
        if not isinstance(self.arena, CudaArena):
            raise WeightsError("fd handover", "needs a CUDA arena; this one is host memory")
        receive(self.arena, path)


def _dest(torch: Any, arena: Arena, flat: Any) -> filling.Dest:
    return HostDest(arena) if isinstance(arena, HostArena) else CudaDest(torch, flat)
