"""Standby weights fillers (restorer/standby.py, workload/standby.py) as processes against a
stand-in libcuda (tests/fake_standby.py): a restore's fill goes to the GPU's standby, started and
ready before the job, and a fresh one follows; a dead standby is replaced; a cold restore's fill
reads each chunk as the host cache verifies it, before the last one is in; a fill that fails
costs only speed."""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from workload_helpers import GRAN, U1, chunk_dir, expected

from snapscale.restorer import hostfill
from snapscale.restorer.cleanup import sweep
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.standby import FILLERS_DIR, Filler, Fillers
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.store import HostCache
from snapscale.workload import ChunkDir, FdHandover, Weights
from snapscale.workload.record import WeightsRecord, chunk_plan, round_up

FAKE = (sys.executable, str(Path(__file__).with_name("fake_standby.py")))
LOGGER = "snapscale.restorer.hostfill"


@pytest.fixture
def record(tmp_path: Path) -> WeightsRecord:
    """A GPU workload's record (arena on cuda:1), eight 16 KiB chunks and a zero tensor."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(300, 70, generator=g), torch.randn(9000, generator=g)
    save_file({"a": a, "z": torch.zeros(5000), "b": b}, str(tmp_path / "m.safetensors"))
    r = Weights.load(str(tmp_path / "m.safetensors"), "cpu", chunk_bytes=16384).record
    arena = replace(r.arena, kind="cuda-vmm", device="cuda:1", size=round_up(r.arena.size, GRAN))
    r = replace(r, arena=arena)
    (tmp_path / "rec.json").write_bytes(r.to_json())
    return r


def take_memory(path: str, size: int) -> bytes:
    """The workload's side, by hand: receive the fd, read what the filler put in it, say mapped."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(path)
        _, fds, _, _ = socket.recv_fds(s, 16, 1)
        assert len(fds) == 1
        try:
            with mmap.mmap(fds[0], size, prot=mmap.PROT_READ) as m:
                data = bytes(m)
        finally:
            os.close(fds[0])
        s.sendall(b"k")
    return data


def assert_filled(r: WeightsRecord, mem: bytes) -> None:
    for t in r.tensors:  # every tensor's bytes at its offset, the zero one included
        assert mem[t.offset : t.offset + t.nbytes] == expected(r)[t.name], t.name


async def until(cond: Callable[[], object], timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def ready_standby(fillers: Fillers, gpu: str) -> Filler:
    await until(lambda: fillers.waiting(gpu) is not None)
    f = fillers.waiting(gpu)
    assert f is not None
    await until(lambda: f.lines)  # its context is made: it said so
    assert json.loads(f.lines[0])["standby"] == f.proc.pid
    return f


@pytest.fixture(autouse=True)
def _filler_reports(caplog: pytest.LogCaptureFixture) -> None:
    """The fillers' reports for the whole test: they come after the restore's block, off its path."""
    caplog.set_level(logging.INFO, logger=LOGGER)


def _reports(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "weights filled by the host" in r.message]


async def filler_said(caplog: pytest.LogCaptureFixture) -> dict[str, object]:
    """What the filler reported, once it has."""
    await until(lambda: _reports(caplog))
    line = _reports(caplog)[0]
    said = line.args[1] if isinstance(line.args, tuple) else None
    assert isinstance(said, dict)
    return said


@pytest.fixture
async def fillers() -> AsyncIterator[Fillers]:
    """Standbys for U1, the stand-in's second card; stopped after the test."""
    fillers = Fillers([U1], standby=True, command=FAKE)
    await fillers.start()
    try:
        yield fillers
    finally:
        await fillers.close()


def warm_job(record: WeightsRecord, tmp_path: Path) -> hostfill.Job:
    """A job whose chunks are all in (a warm restore, a resume)."""
    chunks = chunk_dir(record, tmp_path / "cache")
    return hostfill.Job(record, tmp_path / "rec.json", chunks, U1, tmp_path / "run")


def streaming(record: WeightsRecord, tmp_path: Path) -> tuple[HostCache, asyncio.Future[None], hostfill.Job]:
    """An empty host cache, a weights prefetch not done, and a job that streams from them."""
    cache = HostCache(tmp_path / "hc", 1 << 30)
    prefetch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    rec_path, run = tmp_path / "rec.json", tmp_path / "run"
    return cache, prefetch, hostfill.Job(record, rec_path, cache.chunks_dir, U1, run, cache, prefetch)


async def test_a_restore_hands_its_fill_to_the_standby_started_before_it(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture, fillers: Fillers
) -> None:
    standby = await ready_standby(fillers, U1)
    await asyncio.sleep(0.2)  # the job comes later: its wait shows in the report
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with hostfill.host_fill(warm_job(record, tmp_path), fillers) as fill:
            assert isinstance(fill.source, FdHandover) and fill.ready is not None
            mem = await asyncio.to_thread(take_memory, fill.source.socket, record.arena.size)
            await fill.ready
        await until(lambda: standby.proc.returncode is not None)  # it exits after the block
    assert_filled(record, mem)
    said = await filler_said(caplog)
    # the job's filler is the standby, which was ready and waiting when the job came
    assert said["pid"] == standby.proc.pid and float(str(said["standby_s"])) >= 0.2
    assert said["streamed"] is False
    assert standby.proc.returncode == 0  # one job a process
    fresh = await ready_standby(fillers, U1)  # and a fresh one took its place
    assert fresh.proc.pid != standby.proc.pid
    await fillers.close()
    assert fresh.proc.returncode is not None and fillers.waiting(U1) is None  # stopped at close


async def test_the_restore_does_not_wait_for_its_fillers_exit(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the workload has the memory, what the filler has left (its release, its report, its
    exit) is off the replica's path: the block ends with the filler still running (run 11 on an
    H200: ~0.1 s of a resume's 0.49 s was spent waiting for it)."""
    hold = tmp_path / "let-it-exit"
    monkeypatch.setenv("FAKE_STANDBY_HOLD_EXIT", str(hold))
    fillers = Fillers([U1], standby=True, command=FAKE)
    await fillers.start()
    try:
        standby = await ready_standby(fillers, U1)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            async with hostfill.host_fill(warm_job(record, tmp_path), fillers) as fill:
                assert isinstance(fill.source, FdHandover) and fill.ready is not None
                mem = await asyncio.to_thread(take_memory, fill.source.socket, record.arena.size)
                await fill.ready
            assert standby.proc.returncode is None  # done with the job, not yet exited
            hold.touch()
            await until(lambda: any("weights filled by the host" in r.message for r in caplog.records))
        assert_filled(record, mem)
        assert (await filler_said(caplog))["pid"] == standby.proc.pid and standby.proc.returncode == 0
    finally:
        await fillers.close()


async def test_a_dead_standby_is_replaced_and_the_job_still_filled(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture, fillers: Fillers
) -> None:
    dead = await ready_standby(fillers, U1)
    with caplog.at_level(logging.INFO):
        dead.proc.kill()
        await dead.proc.wait()
        fresh = await ready_standby(fillers, U1)  # replaced in the background, before any job
        assert fresh.proc.pid != dead.proc.pid
        assert f"standby filler {dead.proc.pid} for {U1} exited -9 while waiting" in caplog.text
        async with hostfill.host_fill(warm_job(record, tmp_path), fillers) as fill:
            assert isinstance(fill.source, FdHandover)
            mem = await asyncio.to_thread(take_memory, fill.source.socket, record.arena.size)
    assert_filled(record, mem)
    assert (await filler_said(caplog))["pid"] == fresh.proc.pid


async def test_a_standby_found_dead_at_a_job_is_replaced_by_one_started_then(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fillers = Fillers([U1], standby=True, command=FAKE)
    await fillers.start()
    try:
        dead = await ready_standby(fillers, U1)
        fillers._closing = True  # nothing replaces it in the background: the job finds it dead
        dead.proc.kill()
        await dead.proc.wait()
        fillers._closing = False
        with caplog.at_level(logging.INFO):
            async with hostfill.host_fill(warm_job(record, tmp_path), fillers) as fill:
                assert isinstance(fill.source, FdHandover)
                mem = await asyncio.to_thread(take_memory, fill.source.socket, record.arena.size)
        assert_filled(record, mem)
        assert (await filler_said(caplog))["pid"] not in (dead.proc.pid, None)
    finally:
        await fillers.close()


async def test_a_cold_restores_fill_reads_chunks_as_they_land_before_the_last(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture, fillers: Fillers
) -> None:
    src = chunk_dir(record, tmp_path / "src")
    order = list(dict.fromkeys(os.path.basename(s.path) for s in chunk_plan(record, str) if s.path))
    first, last = order[:-1], order[-1]
    cache, prefetch, job = streaming(record, tmp_path)
    f = await ready_standby(fillers, U1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with hostfill.host_fill(job, fillers) as fill:
            assert isinstance(fill.source, FdHandover) and fill.ready is not None
            taking = asyncio.create_task(
                asyncio.to_thread(take_memory, fill.source.socket, record.arena.size)
            )
            for d in first:  # the prefetch lands them one by one
                await cache.insert(d, (src / d).read_bytes())
            # the filler copies what is in while the last chunk is still on its way
            await until(lambda: sum(b'"copy"' in x for x in f.lines) >= len(first))
            assert not f.filled.is_set() and not taking.done()
            await cache.insert(last, (src / last).read_bytes())
            prefetch.set_result(None)
            mem = await taking
            await fill.ready
    assert_filled(record, mem)
    assert (await filler_said(caplog))["streamed"] is True


async def test_a_streamed_fill_whose_prefetch_fails_stops_and_the_workload_fills_itself(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture, fillers: Fillers
) -> None:
    _, prefetch, job = streaming(record, tmp_path)
    f = await ready_standby(fillers, U1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with hostfill.host_fill(job, fillers) as fill:
            assert isinstance(fill.source, FdHandover) and fill.ready is not None
            prefetch.set_exception(OSError("the store went away"))
            with pytest.raises(OSError, match="the store went away"):
                await fill.ready  # the engine fails the restore with the prefetch's error
            await until(lambda: f.filled.is_set())
            with pytest.raises(ConnectionRefusedError):  # at once: the workload falls back
                await asyncio.to_thread(take_memory, fill.source.socket, record.arena.size)
    await until(lambda: "weights filler exited 1" in caplog.text)  # reported after the block
    assert "stopped the fill" in caplog.text


async def test_an_idle_standby_ends_when_the_restorers_end_of_its_socket_closes(fillers: Fillers) -> None:
    """What a restorer that died leaves: nothing (the kernel closes its end of every job socket)."""
    f = await ready_standby(fillers, U1)
    f.close()
    assert await asyncio.wait_for(f.proc.wait(), 10) == 1
    await f.ended()
    assert b"the restorer closed the socket" in f.lines[-1]


async def test_no_filler_to_be_had_leaves_the_workload_its_chunk_files(
    record: WeightsRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fillers = Fillers([U1], standby=False, command=(str(tmp_path / "no-such-python"),))
    job = warm_job(record, tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with hostfill.host_fill(job, fillers) as fill:
            assert fill.source == ChunkDir(str(job.chunks)) and fill.ready is None
    assert "no weights filler for run" in caplog.text


def test_the_standby_is_on_unless_turned_off() -> None:
    assert RestorerConfig.from_env("h", {}).fill_standby is True
    assert RestorerConfig.from_env("h", {"SNAPSCALE_FILL_STANDBY": "0"}).fill_standby is False
    with pytest.raises(ConfigError, match="SNAPSCALE_FILL_STANDBY='yes' is not a valid value: want 0 or 1"):
        RestorerConfig.from_env("h", {"SNAPSCALE_FILL_STANDBY": "yes"})


async def test_a_restarted_restorers_sweep_ends_the_fillers_a_crash_left(tmp_path: Path) -> None:
    """Every filler holds the fillers dir open: the sweep a restart runs (cleanup.sweep, as
    restart.py calls it on that dir) finds and ends them."""
    home = tmp_path / "work" / FILLERS_DIR
    left = Fillers([U1], standby=True, home=home, command=FAKE)  # as a crashed restorer's
    await left.start()
    f = await ready_standby(left, U1)
    try:
        assert await sweep([home], []) == [f.proc.pid]
        assert await asyncio.wait_for(f.proc.wait(), 10) == -9 and not home.exists()
    finally:
        await left.close()
