"""The host side of the fd handover: a process beside a restore fills fresh, exportable GPU memory
with a workload's weights from the host cache's chunk files while CRIU restores the workload, and
hands it over as a POSIX fd on a Unix socket; the workload (`FdHandover`) maps it at its arena's
addresses, ~1 ms on its critical path instead of the fill (the probe in docs/weights.md: 1.09-1.20 s
restore -> answer for 4 GiB, the fill in parallel).

The filling process is `snapscale.workload.standby` (started ahead of the job, its context made);
this module is its fill (`serve_filled`), the handover on both sides (`hand_over`, `receive`) and
its one-JSON-line report (`outcome`). Standard library and libcuda: no torch.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from snapscale.workload import fill as filling
from snapscale.workload import record as rec
from snapscale.workload.errors import WeightsError
from snapscale.workload.vmm import CudaArena, Vmm, uuid_raw

_ptr, _size, _ref = ctypes.c_uint64, ctypes.c_size_t, ctypes.byref
RECEIVE_TIMEOUT_S = 300.0


def uuid_bytes(uuid: str) -> bytes:
    """'GPU-xxxxxxxx-xxxx-...' (as nvidia-smi and NVML write them) as CUDA's 16 bytes. Pure."""
    raw = uuid_raw(uuid)
    if raw is None:
        raise WeightsError("gpu", f"{uuid!r} is not a GPU UUID")
    return raw


class HostVmm(Vmm):
    """The driver calls a filling process makes beyond an arena's: its own context on the target
    card, pinned staging memory, copies and fills."""

    def device_of(self, uuid: str) -> int:
        want, n = uuid_bytes(uuid), ctypes.c_int(0)
        self._check("cuDeviceGetCount", self._lib.cuDeviceGetCount(_ref(n)))
        for i in range(n.value):
            dev, u = ctypes.c_int(0), (ctypes.c_ubyte * 16)()
            self._check("cuDeviceGet", self._lib.cuDeviceGet(_ref(dev), i))
            self._check("cuDeviceGetUuid", self._lib.cuDeviceGetUuid(_ref(u), dev))
            if bytes(u) == want:
                return int(dev.value)
        raise WeightsError("gpu", f"{uuid} is not one of the {n.value} GPUs this process sees")

    def use_device(self, device: int) -> None:
        """Make the device's primary context current in this thread (the one that copies)."""
        ctx = ctypes.c_void_p(0)
        self._check("cuDevicePrimaryCtxRetain", self._lib.cuDevicePrimaryCtxRetain(_ref(ctx), device))
        self._check("cuCtxSetCurrent", self._lib.cuCtxSetCurrent(ctx))

    def host_alloc(self, size: int) -> int:
        p = ctypes.c_void_p(0)
        self._check("cuMemHostAlloc", self._lib.cuMemHostAlloc(_ref(p), _size(size), ctypes.c_uint(0)))
        return int(p.value or 0)

    def host_free(self, ptr: int) -> None:
        self._check("cuMemFreeHost", self._lib.cuMemFreeHost(ctypes.c_void_p(ptr)))

    def copy_to_device(self, dst: int, src: int, n: int) -> None:
        self._check("cuMemcpyHtoD", self._lib.cuMemcpyHtoD_v2(_ptr(dst), ctypes.c_void_p(src), _size(n)))

    def zero(self, dst: int, n: int) -> None:
        self._check("cuMemsetD8", self._lib.cuMemsetD8_v2(_ptr(dst), ctypes.c_ubyte(0), _size(n)))

    def synchronize(self) -> None:
        self._check("cuCtxSynchronize", self._lib.cuCtxSynchronize())


class DeviceDest:
    """`fill.Dest` over the driver: reads land in pinned buffers, each copied (synchronously, from
    the calling thread, which holds the context) to device address `va` + offset."""

    in_place = False

    def __init__(self, vmm: HostVmm, va: int) -> None:
        self.vmm = vmm
        self.va = va
        self._host = 0
        self._addrs: list[int] = []

    def direct(self, dst: int, n: int) -> memoryview:
        raise WeightsError("fill", "GPU memory is not readable from the host")

    def staging(self, count: int, size: int) -> list[memoryview]:
        self._host = self.vmm.host_alloc(count * size)
        self._addrs = [self._host + i * size for i in range(count)]
        return [memoryview((ctypes.c_char * size).from_address(a)).cast("B") for a in self._addrs]

    def copy(self, dst: int, buf: int, n: int) -> None:
        self.vmm.copy_to_device(self.va + dst, self._addrs[buf], n)

    def wait(self, buf: int) -> None:
        pass  # each copy returned when its source could be reused

    def zero(self, dst: int, n: int) -> None:
        self.vmm.zero(self.va + dst, n)

    def finish(self) -> None:
        self.vmm.synchronize()
        if self._host:
            self.vmm.host_free(self._host)
            self._host, self._addrs = 0, []


def serve_filled(
    vmm: HostVmm, record: rec.WeightsRecord, chunks: str, device: int, listener: socket.socket,
    *, threads: int = filling.DEFAULT_THREADS, timeout_s: float = 120.0, gate: filling.Gate | None = None,
    on_filled: Callable[[], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """New exportable memory of the record's arena size on `device`, filled from the chunk files in
    `chunks` as the arena expects it (each file once `gate` lets it through, if given: a streaming
    fill), handed to the first peer on `listener`; ours is unmapped and released once the peer has
    mapped it (the order the probe ran); `on_filled` is called once the fill is done. What it took."""
    t0 = time.monotonic()
    size = record.arena.size
    gran = vmm.granularity(device)
    if size % gran:
        raise WeightsError("arena.size", f"{size} is not a multiple of the granularity {gran}")
    handle = vmm.create(size, device, exportable=True)
    try:
        va = vmm.reserve(size, gran)
        try:
            vmm.map(va, size, handle, device)
            try:
                plan = rec.chunk_plan(record, lambda d: os.path.join(chunks, d))
                report = filling.fill(DeviceDest(vmm, va), plan, threads=threads, gate=gate)
                t_fill = time.monotonic()
                if on_filled is not None:
                    on_filled()
                fd = vmm.export_fd(handle)
                try:
                    hand_over(listener, fd, timeout_s)
                finally:
                    os.close(fd)
            finally:
                vmm.unmap(va, size)
        finally:
            vmm.free_range(va, size)
    finally:
        vmm.release(handle)
    return {"bytes": report.bytes, "fill_s": round(t_fill - t0, 4), "gbps": round(report.gbps, 2),
            "handover_wait_s": round(time.monotonic() - t_fill, 4)}  # fmt: skip


def hand_over(listener: socket.socket, fd: int, timeout_s: float) -> None:
    """Send `fd` to the first peer on `listener` and wait for its one-byte answer (mapped)."""
    listener.settimeout(timeout_s)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(timeout_s)
        socket.send_fds(conn, [b"w"], [fd])
        if conn.recv(1) != b"k":
            raise WeightsError("fd handover", "the workload closed the socket without mapping the memory")


def receive(arena: CudaArena, path: str) -> None:
    """The workload's side: receive one fd on the Unix socket at `path`, map it over the arena,
    and say so (one byte back)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(RECEIVE_TIMEOUT_S)  # a filler that hangs fails this restore, not the process
        try:
            s.connect(path)
            _, fds, _, _ = socket.recv_fds(s, 16, 1)
        except OSError as e:
            raise WeightsError("fd handover", f"{path}: {e}") from None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise WeightsError("fd handover", f"{path} sent {len(fds)} descriptors, want 1")
        arena.map_fd(fds[0])
        s.sendall(b"k")


def outcome(work: Callable[[], dict[str, Any]]) -> int:
    """Do `work`; print what it returned, or why it failed, as the one last JSON line; exit status."""
    try:
        out = work()
    except (WeightsError, OSError) as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0
