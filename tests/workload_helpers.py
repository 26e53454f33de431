"""Helpers for the weights tests: the host cache's share of a weights record, made by hand, and a
stand-in libcuda for the VMM calls."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from snapscale.workload import handover as ho
from snapscale.workload.record import WeightsRecord

U0 = "GPU-00112233-4455-6677-8899-aabbccddeeff"
U1 = "GPU-ffeeddcc-bbaa-9988-7766-554433221100"


def chunk_dir(r: WeightsRecord, dest: Path) -> Path:
    """One file per distinct non-zero chunk of `r`, named by its digest, as the host cache holds them."""
    dest.mkdir(parents=True, exist_ok=True)
    for d, src in r.sources().items():
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            (dest / d).write_bytes(f.read(src.length))
    return dest


def expected(r: WeightsRecord) -> dict[str, bytes]:
    """Each tensor's bytes, read from the file the record names."""
    out = {}
    for t in r.tensors:
        with open(r.files[t.file].path, "rb") as f:
            f.seek(t.file_offset)
            out[t.name] = f.read(t.nbytes)
    return out


GRAN = 2 << 20


class FakeVmmLib:
    """Stands in for libcuda's VMM calls: records them and answers as the driver would, e.g.
    CUDA_ERROR_INVALID_VALUE (1) for mapping over a mapped range or releasing an unknown handle."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail or {}
        self.reserved: dict[int, int] = {}
        self.handles: dict[int, int] = {}  # handle -> size
        self.mapped: dict[int, int] = {}  # va -> handle
        self.access: dict[int, tuple[int, int]] = {}
        self.exported: dict[int, int] = {}  # fd -> handle
        self._next = 1

    def _new(self) -> int:
        self._next += 1
        return self._next

    def _call(self, name: str, *args: Any) -> int | None:
        self.calls.append((name, *args))
        return self.fail.get(name)

    def cuInit(self, flags: int) -> int:
        return self._call("cuInit") or 0

    def cuGetErrorName(self, code: int, out: Any) -> int:
        names = {1: b"CUDA_ERROR_INVALID_VALUE", 2: b"CUDA_ERROR_OUT_OF_MEMORY"}
        if code not in names:
            return 1
        out._obj.value = names[code]
        return 0

    def cuMemGetAllocationGranularity(self, out: Any, prop: Any, option: int) -> int:
        p = prop._obj
        self.calls.append(("granularity", p.location.id, option))
        out._obj.value = GRAN
        return 0

    def cuMemAddressReserve(self, out: Any, size: Any, align: Any, addr: Any, flags: Any) -> int:
        if (e := self._call("reserve", size.value, align.value)) is not None:
            return e
        va = 0x7F0000000000 + len(self.reserved) * (1 << 36)
        self.reserved[va] = size.value
        out._obj.value = va
        return 0

    def cuMemAddressFree(self, va: Any, size: Any) -> int:
        self._call("free", va.value)
        return 0 if self.reserved.pop(va.value, None) == size.value and va.value not in self.mapped else 1

    def cuMemCreate(self, out: Any, size: Any, prop: Any, flags: Any) -> int:
        p = prop._obj
        if (e := self._call("create", size.value, p.location.id, p.requestedHandleTypes)) is not None:
            return e
        h = self._new()
        self.handles[h] = size.value
        out._obj.value = h
        return 0

    def cuMemMap(self, va: Any, size: Any, offset: Any, handle: Any, flags: Any) -> int:
        if (e := self._call("map", va.value, size.value, handle.value)) is not None:
            return e
        ok = self.reserved.get(va.value) == size.value and va.value not in self.mapped
        if not ok or self.handles.get(handle.value) != size.value:
            return 1
        self.mapped[va.value] = handle.value
        return 0

    def cuMemSetAccess(self, va: Any, size: Any, desc: Any, count: Any) -> int:
        d = desc._obj
        if (e := self._call("access", va.value, d.location.id, d.flags, count.value)) is not None:
            return e
        self.access[va.value] = (d.location.id, d.flags)
        return 0 if va.value in self.mapped else 1

    def cuMemUnmap(self, va: Any, size: Any) -> int:
        self._call("unmap", va.value)
        return 0 if self.mapped.pop(va.value, None) is not None else 1

    def cuMemRelease(self, handle: Any) -> int:
        self._call("release", handle.value)
        return 0 if self.handles.pop(handle.value, None) is not None else 1

    def cuMemExportToShareableHandle(self, out: Any, handle: Any, kind: int, flags: Any) -> int:
        self._call("export", handle.value, kind)
        fd = os.open("/dev/null", os.O_RDONLY)
        self.exported[fd] = handle.value
        out._obj.value = fd
        return 0

    def cuMemImportFromShareableHandle(self, out: Any, os_handle: Any, kind: int) -> int:
        self._call("import", kind)
        src = self.exported.get(os_handle.value)
        if src is None:
            return 1
        h = self._new()
        self.handles[h] = self.handles[src]
        out._obj.value = h
        return 0


class FakeDeviceLib(FakeVmmLib):
    """FakeVmmLib whose allocations hold bytes (shared by an exported fd's importers), with two
    cards, pinned host memory and copies."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        super().__init__(fail)
        self.memory: dict[int, bytearray] = {}  # handle -> its bytes
        self.pinned: dict[int, Any] = {}  # address -> buffer
        self.current: int | None = None
        self.by_inode: dict[int, int] = {}

    def _at(self, dst: int, n: int) -> tuple[bytearray, int]:
        for va, h in self.mapped.items():
            if va <= dst and dst + n <= va + self.handles[h]:
                mem = self.memory.setdefault(h, bytearray(self.handles[h]))
                return mem, dst - va
        raise AssertionError(f"no mapping holds {dst:#x}+{n}")

    # An exported fd is a memfd here, known by its inode: it arrives under another number.
    def cuMemExportToShareableHandle(self, out: Any, handle: Any, kind: int, flags: Any) -> int:
        self._call("export", handle.value, kind)
        fd = os.memfd_create("allocation")
        self.by_inode[os.fstat(fd).st_ino] = handle.value
        out._obj.value = fd
        return 0

    def cuMemImportFromShareableHandle(self, out: Any, os_handle: Any, kind: int) -> int:
        self._call("import", kind)
        src = self.by_inode.get(os.fstat(os_handle.value).st_ino)
        if src is None or src not in self.handles:
            return 1
        h = self._new()
        self.handles[h] = self.handles[src]
        self.memory[h] = self.memory.setdefault(src, bytearray(self.handles[src]))
        out._obj.value = h
        return 0

    def cuDeviceGetCount(self, out: Any) -> int:
        out._obj.value = 2
        return 0

    def cuDeviceGet(self, out: Any, i: int) -> int:
        out._obj.value = i
        return 0

    def cuDeviceGetUuid(self, out: Any, dev: Any) -> int:
        ctypes.memmove(out._obj, ho.uuid_bytes((U0, U1)[dev.value]), 16)
        return 0

    def cuDevicePrimaryCtxRetain(self, out: Any, dev: int) -> int:
        out._obj.value = 0x1000 + dev
        return 0

    def cuCtxSetCurrent(self, ctx: Any) -> int:
        self.current = ctx.value
        return 0

    def cuMemHostAlloc(self, out: Any, size: Any, flags: Any) -> int:
        buf = ctypes.create_string_buffer(size.value)
        self.pinned[ctypes.addressof(buf)] = buf
        out._obj.value = ctypes.addressof(buf)
        return self._call("host_alloc", size.value) or 0

    def cuMemFreeHost(self, p: Any) -> int:
        return 0 if self.pinned.pop(p.value, None) is not None else 1

    def cuMemcpyHtoD_v2(self, dst: Any, src: Any, n: Any) -> int:
        assert self.current is not None, "a copy without a current context"
        mem, at = self._at(dst.value, n.value)
        mem[at : at + n.value] = ctypes.string_at(src.value, n.value)
        return self._call("copy", n.value) or 0

    def cuMemsetD8_v2(self, dst: Any, value: Any, n: Any) -> int:
        mem, at = self._at(dst.value, n.value)
        mem[at : at + n.value] = bytes([value.value]) * n.value
        return 0

    def cuCtxSynchronize(self) -> int:
        return 0
