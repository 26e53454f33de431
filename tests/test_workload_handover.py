"""The fd handover without a GPU: a filling process's side (its context on the card named by UUID,
pinned staging, copies, exportable memory) against a stand-in libcuda whose device memory holds
bytes, the workload's side mapping what it was handed at its arena's addresses, and the restorer
starting the filler beside a restore (SNAPSCALE_WEIGHTS_FILL=host)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from workload_helpers import GRAN, U0, U1, FakeDeviceLib, chunk_dir, expected

from snapscale.restorer import hostfill
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.standby import Fillers
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import EngineError
from snapscale.shared.store import HostCache
from snapscale.workload import ChunkDir, FdHandover, Weights, WeightsError
from snapscale.workload import handover as ho
from snapscale.workload.record import IMAGE_FILE, WeightsRecord, round_up
from snapscale.workload.vmm import CudaArena, Vmm


@pytest.fixture
def record(tmp_path: Path) -> WeightsRecord:
    """A record as a GPU workload's: the arena a CUDA one, its size a multiple of the granularity;
    one tensor all zeros (a chunk the fill writes with memset, not from a file)."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(300, 70, generator=g), torch.randn(9000, generator=g)
    save_file({"a": a, "z": torch.zeros(5000), "b": b}, str(tmp_path / "m.safetensors"))
    r = Weights.load(str(tmp_path / "m.safetensors"), "cpu", chunk_bytes=16384).record
    arena = replace(r.arena, kind="cuda-vmm", device="cuda:1", size=round_up(r.arena.size, GRAN))
    return replace(r, arena=arena)


def listening(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_the_filled_memory_is_handed_over_and_mapped_at_the_arena(
    record: WeightsRecord, tmp_path: Path
) -> None:
    lib = FakeDeviceLib()
    host = ho.HostVmm(lib)
    dev = host.device_of(U1)
    assert dev == 1
    host.use_device(dev)
    chunks = chunk_dir(record, tmp_path / "cache")
    arena = CudaArena(Vmm(lib), 1, record.arena.size)  # the workload's, its range reserved at boot
    listener = listening(tmp_path / "w.sock")
    got: dict[str, Any] = {}
    filler = threading.Thread(
        target=lambda: got.update(ho.serve_filled(host, record, str(chunks), dev, listener, threads=3))
    )
    filler.start()
    ho.receive(arena, str(tmp_path / "w.sock"))
    filler.join(10)
    listener.close()
    assert got["bytes"] == sum(os.path.getsize(chunks / d) for d in os.listdir(chunks))
    mem = lib.memory[lib.mapped[arena.va]]
    for t in record.tensors:  # every tensor's bytes at its offset, the zero one included
        assert bytes(mem[t.offset : t.offset + t.nbytes]) == expected(record)[t.name], t.name
    # The filler kept nothing: its range freed, its handle released, its pinned buffers given back.
    assert list(lib.reserved) == [arena.va] and list(lib.mapped) == [arena.va]
    assert set(lib.handles) == {arena.handle} and lib.pinned == {}
    assert ("create", record.arena.size, 1, 1) in lib.calls  # exportable, on the card named


def test_a_fill_that_fails_hands_nothing_over_and_the_workload_is_told(
    record: WeightsRecord, tmp_path: Path
) -> None:
    lib = FakeDeviceLib()
    chunks = chunk_dir(record, tmp_path / "cache")
    os.unlink(chunks / sorted(record.chunk_sizes())[0])  # evicted under it
    host = ho.HostVmm(lib)
    dev = host.device_of(U0)
    host.use_device(dev)
    with listening(tmp_path / "w.sock") as listener, pytest.raises(WeightsError, match="cannot open"):
        ho.serve_filled(host, record, str(chunks), dev, listener)
    arena = CudaArena(Vmm(lib), 0, record.arena.size)
    with pytest.raises(WeightsError, match="fd handover"):
        ho.receive(arena, str(tmp_path / "w.sock"))  # closed: refused at once, not a hang
    assert not arena.mapped and lib.handles == {} and lib.pinned == {}


def test_a_gpu_is_found_by_its_uuid_or_refused() -> None:
    host = ho.HostVmm(FakeDeviceLib())
    assert host.device_of(U0) == 0
    with pytest.raises(WeightsError, match="is not one of the 2 GPUs"):
        host.device_of("GPU-" + "0" * 32)
    with pytest.raises(WeightsError, match="is not a GPU UUID"):
        ho.uuid_bytes("GPU-12")


async def test_a_host_fill_that_cannot_fill_fails_the_workloads_fill_not_the_restorer(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The restorer's side, where there is no CUDA: the filler process (the real module) starts on
    the socket the restorer bound, says why it cannot fill, and exits; the workload is refused at
    once, and nothing is left behind."""
    (tmp_path / "rec.json").write_bytes(record.to_json())
    chunks = chunk_dir(record, tmp_path / "cache")
    arena = CudaArena(Vmm(FakeDeviceLib()), 1, record.arena.size)
    run = tmp_path / ("r" * 100)  # too long a path for a Unix socket: it goes under the temp dir
    assert hostfill.socket_path(tmp_path) == tmp_path / hostfill.SOCKET_NAME
    with caplog.at_level(logging.INFO, logger="snapscale.restorer.hostfill"):
        job = hostfill.Job(record, tmp_path / "rec.json", chunks, U1, run)
        async with hostfill.host_fill(job, Fillers([U1], standby=False)) as fill:
            src = fill.source
            assert isinstance(src, FdHandover)
            assert stat.S_ISSOCK(os.stat(src.socket).st_mode) and not src.socket.startswith(str(run))
            assert fill.ready is not None
            await fill.ready  # the filler failed: nothing to wait for
            with pytest.raises(WeightsError, match="fd handover"):
                await asyncio.to_thread(ho.receive, arena, src.socket)
        for _ in range(500):  # the filler is settled after the block, off the restore's path
            if "weights filler exited 1" in caplog.text and not Path(src.socket).exists():  # noqa: ASYNC240
                break
            await asyncio.sleep(0.01)
    assert (
        not arena.mapped
        and os.listdir(tempfile.gettempdir()).count(os.path.basename(os.path.dirname(src.socket))) == 0
    )
    assert "weights filler exited 1" in caplog.text and "CUDA" in caplog.text


def test_the_host_fill_targets_the_card_the_arena_is_on(record: WeightsRecord) -> None:
    assert hostfill.target_gpu(record, [U0, U1]) == U1  # the record's arena is on cuda:1
    with pytest.raises(EngineError, match="weights arena on 'cuda:1'; this replica has 1 GPUs"):
        hostfill.target_gpu(record, [U0])
    cpu = replace(record, arena=replace(record.arena, device="cpu"))
    with pytest.raises(EngineError, match="weights arena on 'cpu'"):
        hostfill.target_gpu(cpu, [U0])


async def test_the_host_fill_is_asked_for_and_only_for_gpu_replicas(
    record: WeightsRecord, tmp_path: Path
) -> None:
    assert RestorerConfig.from_env("h", {}).weights_fill == "workload"
    assert RestorerConfig.from_env("h", {"SNAPSCALE_WEIGHTS_FILL": "host"}).weights_fill == "host"
    with pytest.raises(ConfigError, match="SNAPSCALE_WEIGHTS_FILL='gpu': want workload or host"):
        RestorerConfig.from_env("h", {"SNAPSCALE_WEIGHTS_FILL": "gpu"})
    in_host_memory = replace(record, arena=replace(record.arena, kind="host", device="cpu"))
    cache = HostCache(tmp_path / "c", 1 << 30)
    (tmp_path / IMAGE_FILE).write_bytes(in_host_memory.to_json())
    # No filler: not asked, no GPU, or weights a GPU replica keeps in host memory.
    for fill, gpus in (("workload", [U0]), ("host", []), ("host", [U0])):
        fillers = Fillers(gpus, standby=False)
        async with hostfill.weights_source(fill, tmp_path, cache, gpus, tmp_path / "r", fillers) as src:
            assert src.source == ChunkDir(str(cache.chunks_dir)) and src.ready is None
