"""Checkpoints whose weights are outside the image: the manifest lists their chunks (format 2),
upload reads them from the files the workload named (verified, deduplicated across checkpoints),
prefetch brings them into the host cache, verify and GC count them, and a workload fills its
weights from the host cache's chunk files."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import torch
from safetensors.torch import save_file
from storefix import KEY, store

from snapscale.shared.store import HostCache, Prefetcher
from snapscale.shared.store import manifest as mf
from snapscale.shared.store.backend import ChunkStore, StoreError
from snapscale.shared.store.checkpoint import (
    EarlyUpload,
    collect_garbage,
    upload_image,
    upload_weights,
    verify_checkpoint,
)
from snapscale.shared.store.manifest import Manifest, WeightChunk, load_manifest
from snapscale.shared.store.prefetch import part_of, split_weights
from snapscale.workload import ChunkDir, Weights
from snapscale.workload.record import IMAGE_FILE

__all__ = ["store"]  # fixtures
CB = 4096


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w1": torch.randn(64, 100, generator=g), "w2": torch.randn(3000, generator=g)}


def image_with_weights(tmp: Path, name: str, weights: Weights) -> Path:
    """An image dir as the engine leaves one: CRIU's files (stand-ins here) and the weights record."""
    img = tmp / name
    img.mkdir()
    (img / "pages-1.img").write_bytes(os.urandom(100_000))
    (img / "core-1.img").write_bytes(b"core")
    (img / IMAGE_FILE).write_bytes(weights.record.to_json())
    return img


@pytest.fixture
def loaded(tmp_path: Path) -> Weights:
    save_file(tensors(), str(tmp_path / "m.safetensors"))
    return Weights.load(str(tmp_path / "m.safetensors"), "cpu", chunk_bytes=CB)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(data)


async def upload(
    st: ChunkStore, img: Path, cid: str, early: EarlyUpload | None = None
) -> tuple[Manifest, int]:
    m, _key, rep = await upload_image(
        st, img, deployment="demo", checkpoint_id=cid, compat={"criu": "4.2.1"}, compat_hash="h1",
        signing_key=KEY, chunk_bytes=1 << 16, early=early,
    )  # fmt: skip
    assert rep.weight_bytes == m.weight_bytes
    return m, rep.new_bytes


async def test_weights_travel_with_the_checkpoint(store: ChunkStore, loaded: Weights, tmp_path: Path) -> None:
    record = loaded.record
    m, new = await upload(store, image_with_weights(tmp_path, "a", loaded), "c1")
    assert m.format_version == mf.WEIGHTS_FORMAT_VERSION
    assert {w.digest: w.size for w in m.weights} == record.chunk_sizes()
    assert m.weight_digests() <= m.digests() and m.chunk_sizes()[m.weights[0].digest] == m.weights[0].size
    assert new >= m.weight_bytes == record.nbytes  # no zero chunks in these tensors
    assert (await verify_checkpoint(store, m)).ok
    for w in m.weights:  # stored under their names, bytes that hash to them
        assert hashlib.sha256(await store.get_chunk(w.digest)).hexdigest() == w.digest

    # Another checkpoint (another image) of the same weights uploads none of them again.
    img_b = image_with_weights(tmp_path, "b", loaded)
    m2, new2 = await upload(store, img_b, "c2")
    assert m2.weights == m.weights and new2 == (img_b / "pages-1.img").stat().st_size  # its only new file

    # GC keeps what manifests reference, the weights included.
    plan = await collect_garbage(store, KEY, grace_s=0, dry_run=True)
    assert not set(plan.delete) & m.weight_digests()

    # Prefetch brings the weights into the host cache, where the workload fills from.
    cache = HostCache(tmp_path / "cache", 1 << 30)
    rep = await Prefetcher(store, cache).prefetch(m)
    assert m.weight_digests() <= set(cache.digests()) and rep.bytes_fetched >= m.weight_bytes
    loaded.release()
    loaded.restore(ChunkDir(str(cache.chunks_dir)))
    for name, t in tensors().items():
        assert torch.equal(loaded.tensors[name], t), name


async def test_weights_uploaded_during_the_freeze_are_not_read_again(
    store: ChunkStore, loaded: Weights, tmp_path: Path
) -> None:
    record = loaded.record
    early = await upload_weights(store, record)
    assert early.digests == set(record.chunk_sizes()) and early.new_bytes == record.nbytes
    assert early.new_chunks == len(early.digests)
    # The file changes after they went up: the image's upload would refuse it if it read them again.
    flip_byte(Path(record.files[0].path), record.tensors[0].file_offset + 10)
    img = image_with_weights(tmp_path, "a", loaded)
    m, new = await upload(store, img, "c1", early)
    assert {w.digest: w.size for w in m.weights} == record.chunk_sizes()
    assert new == early.new_bytes + sum(p.stat().st_size for p in img.iterdir())  # each sent once
    assert (await verify_checkpoint(store, m, deep=True)).ok
    # A second early upload of the same weights (another checkpoint) finds them all there.
    again = await upload_weights(
        store, replace(record, files=(replace(record.files[0], path=str(tmp_path / "x")),))
    )
    assert again.new_bytes == 0 and again.digests == early.digests


async def test_a_weights_file_changed_since_the_record_is_not_uploaded(
    store: ChunkStore, loaded: Weights, tmp_path: Path
) -> None:
    img = image_with_weights(tmp_path, "a", loaded)
    flip_byte(Path(loaded.record.files[0].path), loaded.record.tensors[0].file_offset + 10)
    with pytest.raises(StoreError, match=r"m\.safetensors changed while uploading"):
        await upload(store, img, "c1")
    assert await store.list_manifests() == []  # nothing published


async def test_an_unreadable_record_stops_the_upload(
    store: ChunkStore, loaded: Weights, tmp_path: Path
) -> None:
    img = image_with_weights(tmp_path, "a", loaded)
    (img / IMAGE_FILE).write_bytes(b'{"format": 7}')
    with pytest.raises(StoreError, match=r"snapscale-weights\.json\.format: 7 is not a format"):
        await upload(store, img, "c1")


def plain_manifest(weights: list[WeightChunk]) -> Manifest:
    return Manifest(
        format_version=mf.WEIGHTS_FORMAT_VERSION if weights else mf.FORMAT_VERSION, checkpoint_id="c",
        deployment="d", compat={}, compat_hash="h", chunk_bytes=8, files=[], total_bytes=0,
        unique_bytes=0, new_bytes=0, zero_bytes=0, created_at=1.0, weights=weights,
    )  # fmt: skip


def test_a_manifest_without_weights_reads_as_before() -> None:
    raw = orjson.loads(mf.encode_manifest(plain_manifest([]), KEY))["manifest"]
    assert "weights" not in raw and raw["format_version"] == 1


D = hashlib.sha256(b"w").hexdigest()


@pytest.mark.parametrize(
    ("version", "weights", "match"),
    [
        (2, [], "format version 2 with 0 weight chunks"),
        (1, [WeightChunk(D, 8)], "format version 1 with 1 weight chunks"),
        (2, [WeightChunk("zero", 8)], "'zero' is not a sha256 digest"),
        (2, [WeightChunk(D, 8), WeightChunk(D, 8)], "listed twice"),
        (2, [WeightChunk(D, 0)], "has size 0"),
    ],
)
def test_weights_in_a_manifest_are_checked(version: int, weights: list[WeightChunk], match: str) -> None:
    m = replace(plain_manifest(weights), format_version=version)
    with pytest.raises(mf.ManifestError, match=match):
        mf.check_manifest(m)


def test_a_weights_manifest_round_trips() -> None:
    m = plain_manifest([WeightChunk(D, 8)])
    assert load_manifest(mf.encode_manifest(m, KEY), KEY) == m


async def test_a_prefetch_of_the_whole_does_not_join_a_part(
    store: ChunkStore, loaded: Weights, tmp_path: Path
) -> None:
    """A restore prefetches a checkpoint's image, then its weights (split_weights); a prefetch of
    the whole running meanwhile (another restore, a warm-up command) brings all of it."""
    m, _ = await upload(store, image_with_weights(tmp_path, "a", loaded), "c1")
    image, rest = split_weights(m)
    assert image.digests() == m.digests() - m.weight_digests() and rest.digests() == m.weight_digests()
    assert [part_of(x) for x in (m, image, rest)] == ["", "#image", "#weights"]
    cache = HostCache(tmp_path / "cache", 1 << 30)
    pf = Prefetcher(store, cache)
    part = asyncio.ensure_future(pf.prefetch(image))
    await asyncio.sleep(0)  # the part's job is running
    assert pf.running() == ["demo/c1#image"]
    whole = await pf.prefetch(m)
    await part
    assert not whole.joined and m.digests() <= set(cache.digests())
