"""snapscale.workload without a GPU: the safetensors layout (read against the real writer), the
record and its refusals, the fill plans, fills into a host arena (in place and staged the way a
device is filled), Weights load/release/restore on CPU, and the refusal where there is no CUDA."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from workload_helpers import chunk_dir

from snapscale.workload import FdHandover, NoVmmError, Weights, WeightsError
from snapscale.workload import record as rec
from snapscale.workload.arena import HostArena, HostDest
from snapscale.workload.fill import fill
from snapscale.workload.hooks import ChunkDir, SourceFiles
from snapscale.workload.record import Segment, WeightsRecord
from snapscale.workload.stfile import parse_header, read_layout

CB = 4096  # a small chunk size, so tensors span several chunks


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embed": torch.randn(300, 70, generator=g).to(torch.bfloat16),  # 42000 bytes: 11 chunks
        "bias": torch.zeros(1000),  # one all-zero chunk
        "ids": torch.arange(10, dtype=torch.int64),
        "scale": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def test_layout_matches_what_the_writer_wrote(tmp_path: Path) -> None:
    sd = sample_tensors()
    p = write(tmp_path / "w.safetensors", sd, {"note": "x"})
    content = p.read_bytes()
    layout = {t.name: t for t in read_layout(str(p))}
    assert set(layout) == set(sd)
    for name, t in layout.items():
        assert t.shape == tuple(sd[name].shape)
        assert content[t.start : t.start + t.nbytes] == raw(sd[name])
    assert layout["embed"].dtype == "BF16" and layout["ids"].dtype == "I64"


def header_file(tmp_path: Path, header: dict[str, Any], data: bytes = b"\0" * 64) -> str:
    h = json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return str(p)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, r"\.t\.dtype: unknown dtype 'Q7'"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, r"\[0, 4\] does not hold 8"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, r"\.t\.shape: expected a list"),
        ({"t": {"dtype": "U8", "shape": [80], "data_offsets": [0, 80]}}, r"data_offsets: ends at .* past"),
        (
            {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
             "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}},
            r"\.b\.data_offsets: overlaps a",
        ),
        ([1, 2], "expected a JSON object"),
    ],
)  # fmt: skip
def test_bad_headers_name_the_tensor_and_field(tmp_path: Path, header: Any, match: str) -> None:
    with pytest.raises(WeightsError, match=match):
        read_layout(header_file(tmp_path, header))


def test_files_that_are_not_safetensors(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(WeightsError, match="too short"):
        read_layout(str(short))
    huge = tmp_path / "huge"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(WeightsError, match="header length"):
        read_layout(str(huge))
    with pytest.raises(WeightsError, match="cannot open"):
        read_layout(str(tmp_path / "absent"))
    with pytest.raises(WeightsError, match="not JSON"):
        parse_header(b"{nope", 8, 100)


def test_pieces_and_layout() -> None:
    assert rec.pieces(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert rec.pieces(0, 4) == []
    offsets, span = rec.layout([10, 0, 600], align=512)
    assert offsets == [0, 512, 512] and span == 1536


@pytest.fixture
def loaded(tmp_path: Path) -> Weights:
    return Weights.load(str(write(tmp_path / "w.safetensors", sample_tensors())), "cpu", chunk_bytes=CB)


def test_load_into_a_host_arena(loaded: Weights) -> None:
    for name, t in sample_tensors().items():
        assert torch.equal(loaded.tensors[name], t), name
        assert loaded.tensors[name].dtype == t.dtype
    r = loaded.record
    embed = next(t for t in r.tensors if t.name == "embed")
    assert len(embed.chunks) == 11 and embed.offset % rec.ALIGN == 0
    assert next(t for t in r.tensors if t.name == "bias").chunks == (rec.ZERO_CHUNK,)
    assert r.arena.kind == "host" and r.arena.va == loaded.arena.va
    # every chunk's digest is the sha256 of the tensor's bytes at that chunk
    data = raw(sample_tensors()["embed"])
    assert list(embed.chunks) == [
        hashlib.sha256(data[o : o + n]).hexdigest() for o, n in rec.pieces(len(data), CB)
    ]
    assert WeightsRecord.from_json(r.to_json()) == r


def test_a_tensor_has_the_same_chunks_in_any_file(tmp_path: Path) -> None:
    """Chunks are cut from each tensor's first byte, not from the file's: another file holding the
    same tensor (other neighbours, another header length) shares its chunks in the store."""
    sd = sample_tensors()
    a = Weights.load(str(write(tmp_path / "a.safetensors", sd)), "cpu", chunk_bytes=CB)
    other = {"extra": torch.ones(123), "embed": sd["embed"], "a_longer_name_shifts_the_header": torch.ones(1)}
    b = Weights.load(str(write(tmp_path / "b.safetensors", other)), "cpu", chunk_bytes=CB)
    ea = next(t for t in a.record.tensors if t.name == "embed")
    eb = next(t for t in b.record.tensors if t.name == "embed")
    assert ea.file_offset != eb.file_offset
    assert ea.chunks == eb.chunks
    assert set(ea.chunks) <= set(a.record.chunk_sizes()) & set(b.record.chunk_sizes())


def maps_of(va: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if int(line.split("-")[0], 16) == va:
            return line.split()[1]
    return "absent"


def test_release_keeps_the_addresses_and_gives_the_memory_back(loaded: Weights) -> None:
    va = loaded.arena.va
    before = {k: v.data_ptr() for k, v in loaded.tensors.items()}
    assert maps_of(va).startswith("rw")
    r = loaded.release()
    assert loaded.released and r is loaded.record
    assert maps_of(va) == "---p"  # reserved, no access, no pages
    with pytest.raises(WeightsError, match="released already"):
        loaded.release()
    loaded.restore(SourceFiles())
    assert maps_of(va).startswith("rw")
    assert {k: v.data_ptr() for k, v in loaded.tensors.items()} == before
    for name, t in sample_tensors().items():
        assert torch.equal(loaded.tensors[name], t), name
    with pytest.raises(WeightsError, match="release them first"):
        loaded.restore()


def test_restore_from_chunk_files(loaded: Weights, tmp_path: Path) -> None:
    chunks = chunk_dir(loaded.record, tmp_path / "cache")
    loaded.release()
    rep = loaded.restore(ChunkDir(str(chunks)))
    assert rep.bytes == sum(loaded.record.chunk_sizes()[d] for t in loaded.record.tensors for d in t.chunks
                            if d != rec.ZERO_CHUNK)  # fmt: skip
    for name, t in sample_tensors().items():
        assert torch.equal(loaded.tensors[name], t), name
    assert {"load_s", "release_s", "restore_s"} <= loaded.timings.keys()


def test_a_failed_handover_falls_back_to_the_chunk_files_when_named(loaded: Weights, tmp_path: Path) -> None:
    """The host filler failed (here: nothing listens; and a host arena takes no handed-over memory
    anyway): with a fallback the weights come from the chunk files, without one the fill fails."""
    chunks = chunk_dir(loaded.record, tmp_path / "cache")
    loaded.release()
    with pytest.raises(WeightsError, match="fd handover"):
        loaded.restore(FdHandover(str(tmp_path / "no.sock")))
    assert loaded.released
    loaded.restore(FdHandover(str(tmp_path / "no.sock"), fallback=str(chunks)))
    for name, t in sample_tensors().items():
        assert torch.equal(loaded.tensors[name], t), name
    assert loaded.timings["handover_failed"] == 1.0


def test_a_missing_chunk_leaves_the_weights_released(loaded: Weights, tmp_path: Path) -> None:
    chunks = chunk_dir(loaded.record, tmp_path / "cache")
    gone = next(iter(loaded.record.chunk_sizes()))
    (chunks / gone).unlink()
    loaded.release()
    with pytest.raises(WeightsError, match=f"{gone}: cannot open"):
        loaded.restore(ChunkDir(str(chunks)))
    assert loaded.released and maps_of(loaded.arena.va) == "---p"
    (chunks / gone).write_bytes(b"")  # present but short
    with pytest.raises(WeightsError, match="bytes short"):
        loaded.restore(ChunkDir(str(chunks)))
    chunk_dir(loaded.record, tmp_path / "cache2")
    loaded.restore(ChunkDir(str(tmp_path / "cache2")))
    assert torch.equal(loaded.tensors["embed"], sample_tensors()["embed"])


def test_a_changed_source_file_fails_the_verified_refill(loaded: Weights) -> None:
    path = loaded.record.files[0].path
    embed = next(t for t in loaded.record.tensors if t.name == "embed")
    with open(path, "r+b") as f:
        f.seek(embed.file_offset + 5000)
        f.write(b"\x01\x02\x03")
    loaded.release()
    with pytest.raises(WeightsError, match=r"hash to .*, the record says"):
        loaded.restore(SourceFiles(verify=True))
    assert loaded.released
    loaded.restore(SourceFiles(verify=False))  # unverified: takes the file as it is now
    assert not torch.equal(loaded.tensors["embed"], sample_tensors()["embed"])


def test_weights_on_cuda_are_refused_without_libcuda(tmp_path: Path) -> None:
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU host")
    p = write(tmp_path / "w.safetensors", sample_tensors())
    with pytest.raises(NoVmmError, match=r"no CUDA: libcuda\.so\.1 cannot be loaded"):
        Weights.load(str(p), "cuda")
    with pytest.raises(WeightsError, match=r"device: 'tpu'"):
        Weights.load(str(p), "tpu")


# -- fills on their own --
def make_file(tmp_path: Path, n: int) -> tuple[Path, bytes]:
    data = hashlib.sha256(b"seed").digest() * (n // 32)
    p = tmp_path / "src.bin"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("staged", [False, True])
def test_fill_in_place_and_staged_write_the_same_bytes(tmp_path: Path, staged: bool) -> None:
    src, data = make_file(tmp_path, 1 << 16)
    arena = HostArena(1 << 17)
    arena.map()
    try:
        # 20 segments through 2 threads: the staged ring (4 buffers) is reused five times over
        segs = [
            Segment(dst=(1 << 16) + i * 3000, length=3000, path=str(src), src=i * 3000) for i in range(20)
        ]
        segs.append(Segment(dst=100, length=50))  # zeros
        dest = HostDest(arena, staged=staged)
        rep = fill(dest, segs, threads=2, hashing=True)
        got = bytes((ctypes_view(arena))[(1 << 16) : (1 << 16) + 60000])
        assert got == data[:60000]
        assert bytes(ctypes_view(arena)[100:150]) == bytes(50)
        assert rep.bytes == 60000 and rep.digests[-1] == rec.ZERO_CHUNK
        assert rep.digests[3] == hashlib.sha256(data[9000:12000]).hexdigest()
    finally:
        arena.close()


def ctypes_view(arena: HostArena) -> memoryview:
    return HostDest(arena).direct(0, arena.size)


def test_fill_settles_its_destination_when_a_read_fails(tmp_path: Path) -> None:
    src, _ = make_file(tmp_path, 1 << 14)
    arena = HostArena(1 << 16)
    arena.map()
    finished = []

    class Watched(HostDest):
        def finish(self) -> None:
            finished.append(True)
            super().finish()

    segs = [Segment(0, 4096, str(src), 0, digest="0" * 64)]
    try:
        with pytest.raises(WeightsError, match=r"src\.bin@0: 4096 bytes hash to"):
            fill(Watched(arena, staged=True), segs, threads=1)
        assert finished == [True]
    finally:
        arena.close()


# -- the record's refusals --
def good_record() -> dict[str, Any]:
    return {
        "format": 1, "chunk_bytes": 8,
        "arena": {"kind": "cuda-vmm", "device": "cuda:0", "va": 1 << 40, "size": 2 << 20},
        "files": [{"path": "/m.safetensors", "size": 1000}],
        "tensors": [
            {"name": "a", "dtype": "F32", "shape": [4], "offset": 0, "nbytes": 16, "file": 0,
             "file_offset": 100, "chunks": ["a" * 64, "zero"]},
            {"name": "b", "dtype": "BF16", "shape": [2, 2], "offset": 512, "nbytes": 8, "file": 0,
             "file_offset": 116, "chunks": ["b" * 64]},
        ],
    }  # fmt: skip


def test_record_plans() -> None:
    r = WeightsRecord.from_plain(good_record())
    assert r.nbytes == 24 and r.chunk_sizes() == {"a" * 64: 8, "b" * 64: 8}
    assert r.sources()["b" * 64] == rec.ChunkRange("/m.safetensors", 116, 8)
    assert rec.chunk_plan(r, lambda d: f"/cache/{d[:2]}") == [
        Segment(0, 8, "/cache/aa"), Segment(8, 8), Segment(512, 8, "/cache/bb"),
    ]  # fmt: skip
    assert rec.file_plan(r, verify=True)[1] == Segment(8, 8, "/m.safetensors", 108, "zero")
    assert rec.file_plan(r, verify=False)[1] == Segment(8, 8)


def edit(path: str, value: Any) -> dict[str, Any]:
    doc = good_record()
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is ...:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("format", 2, r"weights\.format: 2 is not a format"),
        ("chunk_bytes", 0, r"weights\.chunk_bytes: 0 is out of range"),
        ("arena.kind", "tpu", r"weights\.arena\.kind: must be one of"),
        ("arena.va", ..., r"weights\.arena\.va: missing"),
        ("files", "x", r"weights\.files: expected a list"),
        ("tensors.0.chunks", ["a" * 64], r"tensors\[0\]\.chunks: 1 digests for 16 bytes, want 2"),
        ("tensors.0.chunks", ["A" * 64, "zero"], r"tensors\[0\]\.chunks: 'AAAA.* is not a sha256"),
        ("tensors.1.offset", 8, r"weights\.tensors: 'b' overlaps 'a'"),
        ("tensors.1.offset", 3, r"tensors\[1\]\.offset: 3\+8 is misaligned"),
        ("tensors.1.offset", 2 << 20, r"tensors\[1\]\.offset: .* outside the arena"),
        ("tensors.1.nbytes", 9, r"tensors\[1\]\.nbytes: 9 is not the size of BF16\[2, 2\]"),
        ("tensors.1.file", 1, r"tensors\[1\]\.file: 1 is out of range"),
        ("tensors.1.file_offset", 999, r"tensors\[1\]\.file_offset: 999\+8 is past the file's end"),
        ("tensors.1.name", "a", r"tensors\[1\]\.name: 'a' listed twice"),
        ("tensors.1.dtype", "Q", r"tensors\[1\]\.dtype: unknown dtype 'Q'"),
    ],
)
def test_record_refusals_name_the_field(path: str, value: Any, match: str) -> None:
    with pytest.raises(WeightsError, match=match):
        WeightsRecord.from_plain(edit(path, value))


def test_record_json_refusals() -> None:
    with pytest.raises(WeightsError, match="weights: not JSON"):
        WeightsRecord.from_json(b"{")
    with pytest.raises(WeightsError, match="weights: expected an object"):
        WeightsRecord.from_json(b"[]")
