"""The CUDA checkpoint driver without a GPU: the no-CUDA path, argument packing, UUID remaps, and the
call sequence and error names against a stand-in for libcuda (the one thing that cannot run here)."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pytest

from snapscale.shared.engine import cuda as cuda_ckpt
from snapscale.shared.engine.cuda import CudaCheckpoint, ProcessState
from snapscale.shared.engine.errors import CudaError, NoCudaError

U0 = "GPU-8c1b2f3a-0000-1111-2222-333344445555"
U1 = "GPU-00112233-4455-6677-8899-aabbccddeeff"


def test_missing_libcuda_is_no_cuda() -> None:
    with pytest.raises(NoCudaError, match=r"no CUDA: libcuda-absent\.so\.1 cannot be loaded"):
        CudaCheckpoint.load("libcuda-absent.so.1")


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU host")
def test_this_host_has_no_cuda() -> None:
    assert not cuda_ckpt.available()
    with pytest.raises(NoCudaError):
        cuda_ckpt.driver()


def test_uuid_bytes() -> None:
    assert cuda_ckpt.uuid_bytes(U1) == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert cuda_ckpt.uuid_bytes(U1.removeprefix("GPU-")) == cuda_ckpt.uuid_bytes(U1)
    for bad in ("GPU-1234", "GPU-zz112233-4455-6677-8899-aabbccddeeff", ""):
        with pytest.raises(CudaError, match="is not a GPU UUID"):
            cuda_ckpt.uuid_bytes(bad)


U2 = "GPU-22222222-2222-2222-2222-222222222222"


def test_remap_pairs() -> None:
    assert cuda_ckpt.remap_pairs([U0], [U0], [U0, U1]) == []
    assert cuda_ckpt.remap_pairs([], []) == []
    assert cuda_ckpt.remap_pairs([U0, U1], [U1, U0]) == [(U0, U1), (U1, U0)]
    # The driver wants a permutation of the host's cards (a lone pair is CUDA_ERROR_INVALID_VALUE).
    assert cuda_ckpt.remap_pairs([U0], [U1], [U0, U1]) == [(U0, U1), (U1, U0)]
    assert cuda_ckpt.remap_pairs([U0], [U2], [U0, U1, U2]) == [(U0, U2), (U1, U1), (U2, U0)]
    with pytest.raises(CudaError, match="frozen on 1 GPU"):
        cuda_ckpt.remap_pairs([U0], [U0, U1])
    with pytest.raises(CudaError, match="repeat a GPU"):
        cuda_ckpt.remap_pairs([U0, U1], [U2, U2])


def test_format_uuid_round_trips() -> None:
    assert cuda_ckpt.format_uuid(cuda_ckpt.uuid_bytes(U1)) == U1


def test_struct_layouts_match_cuda_13() -> None:
    assert ctypes.sizeof(cuda_ckpt.CUcheckpointRestoreArgs) == 64
    assert cuda_ckpt.CUcheckpointRestoreArgs.gpuPairsCount.offset == 8
    assert cuda_ckpt.CUcheckpointRestoreArgs.reserved1.offset == 56
    assert ctypes.sizeof(cuda_ckpt.CUcheckpointGpuPair) == 32
    assert ctypes.sizeof(cuda_ckpt.CUcheckpointLockArgs) == 64


def test_pack_restore_args() -> None:
    args, _arr = cuda_ckpt.pack_restore_args([(U0, U1), (U1, U0)])
    assert args.gpuPairsCount == 2
    assert bytes(args.gpuPairs[0].oldUuid.bytes) == cuda_ckpt.uuid_bytes(U0)
    assert bytes(args.gpuPairs[0].newUuid.bytes) == cuda_ckpt.uuid_bytes(U1)
    assert bytes(args.gpuPairs[1].newUuid.bytes) == cuda_ckpt.uuid_bytes(U0)
    assert bytes(args.reserved) == b"\0" * len(args.reserved) and args.reserved1 == 0
    empty, _ = cuda_ckpt.pack_restore_args([])
    assert empty.gpuPairsCount == 0 and not empty.gpuPairs


class FakeLibcuda:
    """Stands in for libcuda (no GPU here): keeps per-PID states and records each call."""

    NAMES = {0: b"CUDA_SUCCESS", 2: b"CUDA_ERROR_OUT_OF_MEMORY", 702: b"CUDA_ERROR_LAUNCH_TIMEOUT"}

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.states: dict[int, int] = {}
        self.calls: list[tuple[str, int, Any]] = []
        self.fail = fail or {}

    def cuInit(self, flags: int) -> int:
        return 0

    def cuGetErrorName(self, code: int, out: Any) -> int:
        if code not in self.NAMES:
            return 1
        out._obj.value = self.NAMES[code]
        return 0

    def cuCheckpointProcessGetState(self, pid: int, out: Any) -> int:
        if pid not in self.states:
            return 3  # CUDA_ERROR_NOT_INITIALIZED: no CUDA in that process
        out._obj.value = self.states[pid]
        return 0

    def _op(self, name: str, pid: int, args: Any, want: int, new: int) -> int:
        self.calls.append((name, pid, args))
        if name in self.fail:
            return self.fail[name]
        if self.states.get(pid) != want:
            return 201  # CUDA_ERROR_INVALID_CONTEXT: wrong state for this step
        self.states[pid] = new
        return 0

    def cuCheckpointProcessLock(self, pid: int, args: Any) -> int:
        if args is not None and args._obj.timeoutMs == 0xDEAD:
            self.calls.append(("lock-rejected", pid, None))
            return 1  # CUDA_ERROR_INVALID_VALUE: a driver that does not take the args struct
        return self._op("lock", pid, None if args is None else args._obj.timeoutMs, 0, 1)

    def cuCheckpointProcessCheckpoint(self, pid: int, args: Any) -> int:
        return self._op("checkpoint", pid, args, 1, 2)

    def cuCheckpointProcessRestore(self, pid: int, args: Any) -> int:
        pairs = None
        if args is not None:
            a = args._obj
            pairs = [
                (bytes(a.gpuPairs[i].oldUuid.bytes), bytes(a.gpuPairs[i].newUuid.bytes))
                for i in range(a.gpuPairsCount)
            ]
        return self._op("restore", pid, pairs, 2, 1)

    def cuCheckpointProcessUnlock(self, pid: int, args: Any) -> int:
        return self._op("unlock", pid, args, 1, 0)


async def test_suspend_then_resume_on_other_gpu() -> None:
    lib = FakeLibcuda()
    lib.states = {100: 0, 101: 0}
    drv = CudaCheckpoint(lib)
    await drv.suspend_tree([100, 101], timeout_ms=1234)
    assert [c[:2] for c in lib.calls] == [
        ("lock", 100),
        ("lock", 101),
        ("checkpoint", 100),
        ("checkpoint", 101),
    ]
    assert lib.calls[0][2] == 1234
    assert drv.state(100) is ProcessState.CHECKPOINTED
    lib.calls.clear()
    # 102 holds no CUDA state: skipped, not an error.
    await drv.resume_tree([100, 101, 102], [(U0, U1)])
    assert [c[:2] for c in lib.calls] == [
        ("restore", 100),
        ("restore", 101),
        ("unlock", 100),
        ("unlock", 101),
    ]
    assert lib.calls[0][2] == [(cuda_ckpt.uuid_bytes(U0), cuda_ckpt.uuid_bytes(U1))]
    assert drv.state(101) is ProcessState.RUNNING


def test_errors_carry_the_curesult_name() -> None:
    lib = FakeLibcuda(fail={"checkpoint": 2})
    lib.states = {7: 0}
    drv = CudaCheckpoint(lib)
    drv.lock(7)
    with pytest.raises(CudaError) as ei:
        drv.checkpoint(7)
    assert ei.value.code == 2 and ei.value.step == "cuda_checkpoint"
    assert "checkpoint on pid 7 failed: CUDA_ERROR_OUT_OF_MEMORY" in str(ei.value)
    lib.fail = {"unlock": 999}
    with pytest.raises(CudaError, match="CUresult 999"):
        drv.unlock(7)


def test_lock_falls_back_without_timeout_when_args_are_rejected() -> None:
    lib = FakeLibcuda()
    lib.states = {9: 0}
    CudaCheckpoint(lib).lock(9, timeout_ms=0xDEAD)
    assert lib.calls == [("lock-rejected", 9, None), ("lock", 9, None)]
    assert lib.states[9] == ProcessState.LOCKED


def test_holders_finds_no_cuda_in_this_process() -> None:
    assert cuda_ckpt.holders([os.getpid(), 999_999_999]) == []
