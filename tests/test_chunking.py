"""Chunking: digests match hashlib, zero chunks are recorded not sourced, short last chunks,
dedup across files, and anything but regular files refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from snapscale.shared.store.chunking import ZERO_CHUNK, ImageError, is_zero, read_chunk, scan_image

CB = 1 << 16


def write(p: Path, data: bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_scan_names_chunks_by_sha256_and_records_zeros(tmp_path: Path) -> None:
    rnd = os.urandom(CB)
    write(tmp_path / "a.img", rnd + bytes(CB) + rnd[:100])  # data, zero chunk, short tail
    write(tmp_path / "sub" / "b.img", rnd)  # same bytes as a's first chunk: one source
    write(tmp_path / "empty.img", b"")
    scan = scan_image(tmp_path, CB, workers=3)
    files = {f.path: f for f in scan.files}
    assert sorted(files) == ["a.img", "empty.img", "sub/b.img"]
    a = files["a.img"]
    assert a.size == 2 * CB + 100
    assert a.chunks == [hashlib.sha256(rnd).hexdigest(), ZERO_CHUNK, hashlib.sha256(rnd[:100]).hexdigest()]
    assert files["sub/b.img"].chunks == [a.chunks[0]]
    assert files["empty.img"].chunks == []
    assert set(scan.sources) == {a.chunks[0], a.chunks[2]}
    assert scan.unique_bytes == CB + 100
    assert scan.zero_bytes == CB
    assert scan.total_bytes == 3 * CB + 100
    for d, src in scan.sources.items():
        assert hashlib.sha256(read_chunk(src)).hexdigest() == d


def test_parallel_and_serial_hashing_agree(tmp_path: Path) -> None:
    write(tmp_path / "big.img", os.urandom(CB * 13 + 7))
    assert scan_image(tmp_path, CB, workers=1) == scan_image(tmp_path, CB, workers=8)


def test_mode_is_recorded(tmp_path: Path) -> None:
    write(tmp_path / "x", b"x")
    os.chmod(tmp_path / "x", 0o600)
    assert scan_image(tmp_path, CB).files[0].mode == 0o600


def test_symlinks_and_fifos_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "real", b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ImageError, match="symlink"):
        scan_image(tmp_path, CB)
    (tmp_path / "link").unlink()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ImageError, match="not a regular file"):
        scan_image(tmp_path, CB)


def test_is_zero() -> None:
    assert is_zero(bytes(3 << 20))
    assert is_zero(bytes(20 << 20))  # longer than the comparison buffer
    assert not is_zero(bytes(20 << 20) + b"\1")
    assert is_zero(b"")
