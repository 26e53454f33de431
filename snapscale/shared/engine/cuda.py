"""The CUDA driver's process checkpoint API over ctypes: lock, checkpoint, restore (GPU remap), unlock.

Called from the agent on the sandbox's PIDs; the calls block for seconds, so async wrappers run them
in a thread. Without libcuda (or with a driver lacking the API) `load()` raises `NoCudaError`.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from snapscale.shared.engine.errors import CudaError, NoCudaError
from snapscale.workload.libcuda import CUDA_SUCCESS, LIBCUDA, Driver, LibcudaMissing, load_library
from snapscale.workload.vmm import uuid_raw

log = logging.getLogger(__name__)

CUDA_ERROR_INVALID_VALUE = 1
DEFAULT_LOCK_TIMEOUT_MS = 30_000


class ProcessState(enum.IntEnum):
    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointRestoreArgs(ctypes.Structure):
    """CUDA 13's layout (FACTS.md): pairs pointer, count, padding to 56 bytes, one u64; 64 in all."""

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
        ("reserved1", ctypes.c_uint64),
    ]


def uuid_bytes(uuid: str) -> bytes:
    """'GPU-8c1b2f3a-....' (NVML, nvidia-smi) -> the 16 bytes of a CUuuid. Pure."""
    raw = uuid_raw(uuid)
    if raw is None:
        raise CudaError(
            "cuda_restore", f"{uuid!r} is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        )
    return raw


def format_uuid(raw: bytes) -> str:
    """16 bytes -> 'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx', NVML's spelling. Pure."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def remap_pairs(old: Sequence[str], new: Sequence[str], host: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Old->new UUID pairs for a restore onto other cards. Pure.

    The driver wants a permutation of the host's GPUs (it answered CUDA_ERROR_INVALID_VALUE to a
    lone 0->1 pair on 2 GPUs), so the cards not named are paired among themselves, in host order.
    Same cards (or none): no pairs, the driver restores in place.
    """
    if len(old) != len(new):
        raise CudaError("cuda_restore", f"frozen on {len(old)} GPU(s), asked to restore onto {len(new)}")
    if len(set(new)) != len(new):
        raise CudaError("cuda_restore", f"restore targets repeat a GPU: {list(new)}")
    if list(old) == list(new):
        return []
    pairs = list(zip(old, new, strict=True))
    rest_src = [u for u in host if u not in set(old)]
    free_dst = [u for u in host if u not in set(new)]
    if len(rest_src) != len(free_dst):
        return pairs  # frozen on cards this host does not have: let the driver judge
    # Cards the move does not touch stay put; a card displaced by a target takes a freed source.
    stay = [u for u in rest_src if u in free_dst]
    moved_src = [u for u in rest_src if u not in stay]
    moved_dst = [u for u in free_dst if u not in stay]
    extra = dict(zip(moved_src, moved_dst, strict=True)) | {u: u for u in stay}
    return pairs + [(u, extra[u]) for u in rest_src]


def pack_restore_args(pairs: Sequence[tuple[str, str]]) -> tuple[CUcheckpointRestoreArgs, Any]:
    """The args struct and the pair array it points into (keep both alive during the call). Pure."""
    args = CUcheckpointRestoreArgs()
    arr = (CUcheckpointGpuPair * max(1, len(pairs)))()
    for i, (o, n) in enumerate(pairs):
        arr[i].oldUuid.bytes[:] = list(uuid_bytes(o))
        arr[i].newUuid.bytes[:] = list(uuid_bytes(n))
    if pairs:
        args.gpuPairs = ctypes.cast(arr, ctypes.POINTER(CUcheckpointGpuPair))
        args.gpuPairsCount = len(pairs)
    return args, arr


def holders(pids: Iterable[int]) -> list[int]:
    """The PIDs among `pids` with a /dev/nvidia* device open: the ones holding CUDA state."""
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/nvidia"):
                out.append(pid)
                break
    return out


class CudaCheckpoint(Driver):
    """One loaded libcuda. Synchronous methods raise `CudaError` carrying the CUresult name."""

    @classmethod
    def load(cls, name: str = LIBCUDA) -> CudaCheckpoint:
        lacking = "no CUDA checkpoint API: the driver is older than 550"
        try:
            return cls(load_library(name, "cuCheckpointProcessLock", lacking))
        except LibcudaMissing as e:
            raise NoCudaError("cuda", str(e)) from None
        except CudaError as e:
            raise NoCudaError("cuda", f"no CUDA: {e.reason}", code=e.code) from None

    def _check(self, what: str, code: int, pid: int | None = None) -> None:
        if code != CUDA_SUCCESS:
            where = f" on pid {pid}" if pid is not None else ""
            raise CudaError(f"cuda_{what}", f"{what}{where} failed: {self.error_name(code)}", code=code)

    def driver_version(self) -> int:
        v = ctypes.c_int(0)
        self._check("cuDriverGetVersion", self._lib.cuDriverGetVersion(ctypes.byref(v)))
        return v.value

    def host_uuids(self) -> list[str]:
        """The UUIDs of the GPUs this process sees (all of the host's, unless it is masked)."""
        n = ctypes.c_int(0)
        self._check("cuDeviceGetCount", self._lib.cuDeviceGetCount(ctypes.byref(n)))
        out = []
        for i in range(n.value):
            dev = ctypes.c_int(0)
            self._check("cuDeviceGet", self._lib.cuDeviceGet(ctypes.byref(dev), i))
            u = CUuuid()
            self._check("cuDeviceGetUuid", self._lib.cuDeviceGetUuid(ctypes.byref(u), dev))
            out.append(format_uuid(bytes(u.bytes)))
        return out

    def state(self, pid: int) -> ProcessState:
        st = ctypes.c_int(-1)
        self._check("get_state", self._lib.cuCheckpointProcessGetState(pid, ctypes.byref(st)), pid)
        return ProcessState(st.value)

    def lock(self, pid: int, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        code = self._lib.cuCheckpointProcessLock(pid, ctypes.byref(args))
        if code == CUDA_ERROR_INVALID_VALUE:
            # A driver that rejects our args struct still locks without a timeout; say so, don't fail.
            log.warning("cuCheckpointProcessLock rejected the timeout args on pid %d; locking without", pid)
            code = self._lib.cuCheckpointProcessLock(pid, None)
        self._check("lock", code, pid)

    def checkpoint(self, pid: int) -> None:
        self._check("checkpoint", self._lib.cuCheckpointProcessCheckpoint(pid, None), pid)

    def restore(self, pid: int, pairs: Sequence[tuple[str, str]] = ()) -> None:
        if not pairs:
            self._check("restore", self._lib.cuCheckpointProcessRestore(pid, None), pid)
            return
        args, arr = pack_restore_args(pairs)
        self._check("restore", self._lib.cuCheckpointProcessRestore(pid, ctypes.byref(args)), pid)
        del arr

    def unlock(self, pid: int) -> None:
        self._check("unlock", self._lib.cuCheckpointProcessUnlock(pid, None), pid)

    # Whole-tree steps, in a thread: the driver calls take seconds for GiBs of GPU memory.
    async def suspend_tree(self, pids: Sequence[int], timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
        """Lock every PID, then checkpoint every PID (GPU memory -> host memory, GPU released)."""

        def run() -> None:
            for pid in pids:
                self.lock(pid, timeout_ms)
            for pid in pids:
                self.checkpoint(pid)

        await asyncio.to_thread(run)

    async def resume_tree(self, pids: Sequence[int], pairs: Sequence[tuple[str, str]] = ()) -> None:
        """Restore every PID (onto the new GPUs when `pairs` remap them), then unlock every PID."""

        def run() -> None:
            states = {}
            for pid in pids:
                try:
                    states[pid] = self.state(pid)
                except CudaError as e:
                    log.debug("pid %d holds no CUDA state: %s", pid, e.reason)
            for pid, st in states.items():
                if st == ProcessState.CHECKPOINTED:
                    self.restore(pid, pairs)
            for pid in states:
                if self.state(pid) == ProcessState.LOCKED:
                    self.unlock(pid)

        await asyncio.to_thread(run)


_loaded: CudaCheckpoint | None = None


def driver() -> CudaCheckpoint:
    """The process-wide driver, loaded once (raises `NoCudaError` where there is no CUDA)."""
    global _loaded
    if _loaded is None:
        _loaded = CudaCheckpoint.load()
    return _loaded


def available() -> bool:
    try:
        driver()
    except NoCudaError:
        return False
    return True


def nvidia_device_present() -> bool:
    return Path("/dev/nvidiactl").exists()
