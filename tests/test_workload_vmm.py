"""The CUDA VMM calls without a GPU: struct layouts as CUDA 12/13 define them, the order of calls
an arena makes (checked against a stand-in libcuda that tracks reservations, allocations and
mappings the way the driver refuses misuse), error names, and the refusal where libcuda is absent."""

from __future__ import annotations

import ctypes
import os

import pytest
from workload_helpers import GRAN, FakeVmmLib

from snapscale.workload import NoVmmError, WeightsError
from snapscale.workload import vmm as vmm_mod
from snapscale.workload.vmm import CudaArena, Vmm


def names(lib: FakeVmmLib) -> list[str]:
    return [c[0] for c in lib.calls]


def test_struct_layouts() -> None:
    assert ctypes.sizeof(vmm_mod.CUmemAllocationProp) == 32
    assert vmm_mod.CUmemAllocationProp.location.offset == 8
    assert vmm_mod.CUmemAllocationProp.allocFlags.offset == 24
    assert ctypes.sizeof(vmm_mod.CUmemAccessDesc) == 12
    p = vmm_mod.alloc_prop(3, exportable=True)
    assert (p.type, p.requestedHandleTypes, p.location.type, p.location.id) == (1, 1, 1, 3)
    assert vmm_mod.alloc_prop(0, exportable=False).requestedHandleTypes == 0


def test_arena_release_and_map_again_at_the_same_range() -> None:
    lib = FakeVmmLib()
    arena = CudaArena(Vmm(lib), 0, 5 << 20)
    assert arena.size == 6 << 20 and arena.va in lib.reserved  # rounded up to the granularity
    arena.map()
    assert names(lib) == ["cuInit", "granularity", "reserve", "create", "map", "access"]
    assert lib.access[arena.va] == (0, 3)  # read-write from device 0
    first = arena.handle
    lib.calls.clear()
    arena.release()
    assert names(lib) == ["unmap", "release"] and not arena.mapped
    assert arena.va in lib.reserved and not lib.handles  # memory gone, addresses kept
    arena.release()  # nothing mapped: nothing to do
    arena.map()
    assert arena.handle != first and lib.mapped == {arena.va: arena.handle}
    lib.calls.clear()
    arena.close()
    assert names(lib) == ["unmap", "release", "free"] and not lib.reserved


def test_map_over_a_mapped_arena_is_refused() -> None:
    arena = CudaArena(Vmm(FakeVmmLib()), 0, GRAN)
    arena.map()
    with pytest.raises(WeightsError, match="already mapped"):
        arena.map()


def test_a_failed_map_gives_its_allocation_back() -> None:
    lib = FakeVmmLib(fail={"map": 2})
    arena = CudaArena(Vmm(lib), 1, GRAN)
    with pytest.raises(WeightsError, match="cuMemMap: failed: CUDA_ERROR_OUT_OF_MEMORY"):
        arena.map()
    assert not lib.handles and not arena.mapped
    assert ("create", GRAN, 1, 0) in lib.calls  # on device 1, not exportable


def test_memory_another_process_filled_is_mapped_from_its_fd() -> None:
    lib = FakeVmmLib()
    host = Vmm(lib)  # the host process: exportable memory, exported as an fd
    h = host.create(GRAN, 0, exportable=True)
    assert ("create", GRAN, 0, 1) in lib.calls
    fd = host.export_fd(h)
    arena = CudaArena(Vmm(lib), 0, GRAN)
    arena.map_fd(fd)
    assert lib.mapped[arena.va] == arena.handle and arena.handle != h
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # the arena closed it
    arena.release()
    assert arena.va in lib.reserved


def test_an_fd_that_is_no_allocation_is_refused_and_closed() -> None:
    arena = CudaArena(Vmm(FakeVmmLib()), 0, GRAN)
    fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(
        WeightsError, match="cuMemImportFromShareableHandle: failed: CUDA_ERROR_INVALID_VALUE"
    ):
        arena.map_fd(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    assert not arena.mapped


def test_unknown_error_codes_are_named_by_number() -> None:
    with pytest.raises(WeightsError, match="cuMemAddressReserve: failed: CUresult 999"):
        CudaArena(Vmm(FakeVmmLib(fail={"reserve": 999})), 0, GRAN)


def test_no_libcuda_is_no_vmm() -> None:
    with pytest.raises(NoVmmError, match=r"no CUDA: libcuda-absent\.so\.1 cannot be loaded"):
        Vmm.load("libcuda-absent.so.1")
    with pytest.raises(NoVmmError, match="has no virtual memory management"):
        Vmm.load("libc.so.6")
    with pytest.raises(NoVmmError, match="no CUDA: cuInit failed: CUDA_ERROR_INVALID_VALUE"):
        Vmm.open(FakeVmmLib(fail={"cuInit": 1}))
