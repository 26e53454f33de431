"""CUDA virtual memory management over ctypes: a GPU arena whose physical memory can be released
and mapped again at the same device addresses, and exported to / imported from another process as
a POSIX file descriptor.

The order of calls is the one measured on an H200 (docs/weights.md): reserve a range once; map =
cuMemCreate + cuMemMap + cuMemSetAccess; release = cuMemUnmap + cuMemRelease, the range kept. The
CUDA checkpoint then carries no weights, and a CUDA graph captured before still reads the same
addresses after the remap. GPU-only; without libcuda `Vmm.load()` raises `NoVmmError`. Takes any
object with libcuda's functions, so the call sequence is tested without a GPU.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Self

from snapscale.workload.errors import NoVmmError, WeightsError
from snapscale.workload.libcuda import LIBCUDA, Driver, LibcudaMissing, load_library
from snapscale.workload.record import round_up

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_HANDLE_TYPE_NONE = 0
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
# Every argument goes as an explicit ctypes value, as the H200 probe called them (no argtypes).
_ptr, _size, _flags, _ref = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_ulonglong, ctypes.byref


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocationFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", CUmemAllocationFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


def uuid_raw(uuid: str) -> bytes | None:
    """'GPU-xxxxxxxx-xxxx-...' (NVML, nvidia-smi) as the 16 bytes of a CUuuid; None when it is not
    one. Pure."""
    try:
        raw = bytes.fromhex(uuid.removeprefix("GPU-").replace("-", ""))
    except ValueError:
        return None
    return raw if len(raw) == 16 else None


def alloc_prop(device: int, *, exportable: bool) -> CUmemAllocationProp:
    """Pinned device memory on `device`; exportable as a POSIX fd when asked. Pure."""
    handles = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR if exportable else CU_MEM_HANDLE_TYPE_NONE
    return CUmemAllocationProp(
        type=CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes=handles,
        location=CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device),
    )


class Vmm(Driver):
    """One loaded libcuda's VMM calls; each failure is a `WeightsError` carrying the CUresult name."""

    @classmethod
    def load(cls, name: str = LIBCUDA) -> Self:
        lacking = f"{name} has no virtual memory management (cuMemAddressReserve)"
        try:
            lib = load_library(name, "cuMemAddressReserve", lacking)
        except LibcudaMissing as e:
            raise NoVmmError("cuda", str(e)) from None
        return cls.open(lib)

    @classmethod
    def open(cls, lib: Any) -> Self:
        """A loaded libcuda whose cuInit fails (a driver but no usable GPU) is no CUDA either."""
        try:
            return cls(lib)
        except WeightsError as e:
            raise NoVmmError("cuda", f"no CUDA: cuInit {e.reason}") from None

    def _check(self, what: str, code: int) -> None:
        if code != 0:
            raise WeightsError(what, f"failed: {self.error_name(code)}")

    def granularity(self, device: int) -> int:
        g = _size(0)
        prop = alloc_prop(device, exportable=False)
        lib = self._lib
        self._check(
            "cuMemGetAllocationGranularity",
            lib.cuMemGetAllocationGranularity(_ref(g), _ref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        )
        return int(g.value)

    def reserve(self, size: int, align: int) -> int:
        va = _ptr(0)
        self._check(
            "cuMemAddressReserve",
            self._lib.cuMemAddressReserve(_ref(va), _size(size), _size(align), _ptr(0), _flags(0)),
        )
        return int(va.value)

    def free_range(self, va: int, size: int) -> None:
        self._check("cuMemAddressFree", self._lib.cuMemAddressFree(_ptr(va), _size(size)))

    def create(self, size: int, device: int, *, exportable: bool = False) -> int:
        h = _flags(0)
        prop = alloc_prop(device, exportable=exportable)
        self._check("cuMemCreate", self._lib.cuMemCreate(_ref(h), _size(size), _ref(prop), _flags(0)))
        return int(h.value)

    def map(self, va: int, size: int, handle: int, device: int) -> None:
        """Map `handle` over the range and make it readable and writable from `device`."""
        lib = self._lib
        self._check("cuMemMap", lib.cuMemMap(_ptr(va), _size(size), _size(0), _flags(handle), _flags(0)))
        loc = CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device)
        acc = CUmemAccessDesc(loc, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self._check("cuMemSetAccess", lib.cuMemSetAccess(_ptr(va), _size(size), _ref(acc), _size(1)))

    def unmap(self, va: int, size: int) -> None:
        self._check("cuMemUnmap", self._lib.cuMemUnmap(_ptr(va), _size(size)))

    def release(self, handle: int) -> None:
        self._check("cuMemRelease", self._lib.cuMemRelease(_flags(handle)))

    def export_fd(self, handle: int) -> int:
        """A POSIX fd for an allocation made `exportable`; the caller owns (and closes) it."""
        fd = ctypes.c_int(-1)
        kind = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._check(
            "cuMemExportToShareableHandle",
            self._lib.cuMemExportToShareableHandle(_ref(fd), _flags(handle), kind, _flags(0)),
        )
        return int(fd.value)

    def import_fd(self, fd: int) -> int:
        """The allocation behind an fd another process exported (the caller still closes `fd`)."""
        h = _flags(0)
        kind = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self._check(
            "cuMemImportFromShareableHandle",
            self._lib.cuMemImportFromShareableHandle(_ref(h), ctypes.c_void_p(fd), kind),
        )
        return int(h.value)


class CudaArena:
    """A reserved device address range of `size` bytes (rounded up to the granularity) on `device`
    (the CUDA ordinal this process sees); `map` backs it with fresh GPU memory, `map_fd` with memory
    another process exported, `release` gives the memory back and keeps the range."""

    kind = "cuda-vmm"

    def __init__(self, vmm: Vmm, device: int, size: int) -> None:
        self.vmm = vmm
        self.index = device
        self.device = f"cuda:{device}"
        gran = vmm.granularity(device)
        self.size = round_up(max(size, 1), gran)
        self.va = vmm.reserve(self.size, gran)
        self.handle: int | None = None

    @property
    def mapped(self) -> bool:
        return self.handle is not None

    def map(self) -> None:
        if self.handle is not None:
            raise WeightsError("arena map", "already mapped")
        self._back(self.vmm.create(self.size, self.index))

    def map_fd(self, fd: int) -> None:
        """Map memory a host process filled and exported, instead of fresh memory; closes `fd`."""
        try:
            if self.handle is not None:
                raise WeightsError("arena map", "already mapped")
            h = self.vmm.import_fd(fd)
        finally:
            os.close(fd)
        self._back(h)

    def _back(self, h: int) -> None:
        """Map the memory handle `h` over the range; a map that fails gives `h` back."""
        try:
            self.vmm.map(self.va, self.size, h, self.index)
        except WeightsError:
            self.vmm.release(h)
            raise
        self.handle = h

    def release(self) -> None:
        if self.handle is None:
            return
        self.vmm.unmap(self.va, self.size)
        self.vmm.release(self.handle)
        self.handle = None

    def close(self) -> None:
        self.release()
        self.vmm.free_range(self.va, self.size)
