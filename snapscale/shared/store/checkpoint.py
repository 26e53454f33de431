"""Checkpoints in the store: upload an image dir (chunks first, manifest last), read a manifest
back verified, check a checkpoint's chunks, and collect chunks no manifest references.

The GC decision (`plan_gc`) is pure; the functions around it do the store I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from snapscale.shared.core.pause import pause_point
from snapscale.shared.store.backend import (
    ChunkStore,
    NotFoundError,
    ObjectInfo,
    StoreError,
    manifest_key,
    run_bounded,
)
from snapscale.shared.store.chunking import ImageScan, read_chunk, scan_image, sha256_hex
from snapscale.shared.store.manifest import (
    FORMAT_VERSION,
    WEIGHTS_FORMAT_VERSION,
    FileEntry,
    Manifest,
    ManifestError,
    WeightChunk,
    encode_manifest,
    load_manifest,
)
from snapscale.workload import WeightsError, WeightsRecord
from snapscale.workload.record import IMAGE_FILE as WEIGHTS_FILE
from snapscale.workload.record import ChunkRange

log = logging.getLogger(__name__)

DEFAULT_GC_GRACE_S = 6 * 3600.0


@dataclass(frozen=True)
class UploadReport:
    total_bytes: int
    unique_bytes: int
    new_bytes: int  # uploaded by this call
    zero_bytes: int
    chunks: int  # distinct non-zero chunks
    new_chunks: int
    timings_s: dict[str, float] = field(default_factory=dict)
    weight_bytes: int = 0  # of the weights outside the image (in unique_bytes too)


@dataclass(frozen=True)
class EarlyUpload:
    """Weight chunks made durable in the store while the freeze was still running."""

    digests: frozenset[str]  # put or touched
    new_bytes: int
    new_chunks: int
    started: float  # time.monotonic() at its start: the GC grace window counts from there
    seconds: float


def weight_sources(image_dir: Path) -> tuple[list[WeightChunk], dict[str, ChunkRange]]:
    """The chunks of the weights kept outside this image, and where to read each (the files the
    workload loaded them from); none when its weights are inside. Blocking."""
    try:
        data = (image_dir / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError:
        return [], {}
    try:
        record = WeightsRecord.from_json(data, WEIGHTS_FILE)
    except WeightsError as e:
        raise StoreError(f"{image_dir}: {e}") from None
    return record_sources(record)


def record_sources(record: WeightsRecord) -> tuple[list[WeightChunk], dict[str, ChunkRange]]:
    ranges = record.sources()
    chunks = [WeightChunk(d, r.length) for d, r in sorted(ranges.items())]
    return chunks, ranges


def _read_range(src: ChunkRange) -> bytes:
    """A chunk's bytes from a file the workload named (it may be a link, as in a model cache)."""
    try:
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            return f.read(src.length)
    except OSError as e:
        raise StoreError(f"weights file {src.path}: {e.strerror}") from None


async def _ensure(
    store: ChunkStore, digest: str, src: ChunkRange, read: Callable[[ChunkRange], bytes]
) -> int:
    """Touch the chunk when the store has it, else read, check and put it; the bytes put."""
    if await store.touch_chunk(digest):
        return 0
    data = await asyncio.to_thread(read, src)
    if sha256_hex(data) != digest:
        raise StoreError(f"{src.path} changed while uploading (chunk at offset {src.offset})")
    await store.put_chunk(digest, data)
    return len(data)


async def upload_weights(store: ChunkStore, record: WeightsRecord, *, concurrency: int = 16) -> EarlyUpload:
    """The chunks of weights a workload released, from its files, while its freeze goes on (the
    record is known from before_freeze on, and the weights are most of a checkpoint's bytes);
    `upload_image(early=...)` then skips them."""
    t0 = time.monotonic()
    _chunks, sources = await asyncio.to_thread(record_sources, record)
    new: list[int] = []

    async def one(digest: str) -> None:
        if n := await _ensure(store, digest, sources[digest], _read_range):
            new.append(n)

    await run_bounded(sources, one, concurrency)
    return EarlyUpload(frozenset(sources), sum(new), len(new), t0, round(time.monotonic() - t0, 4))


async def upload_image(
    store: ChunkStore,
    image_dir: Path,
    *,
    deployment: str,
    checkpoint_id: str,
    compat: dict[str, str],
    compat_hash: str,
    signing_key: bytes,
    timings_s: dict[str, float] | None = None,
    chunk_bytes: int | None = None,
    concurrency: int = 16,
    gc_grace_s: float = DEFAULT_GC_GRACE_S,
    early: EarlyUpload | None = None,
) -> tuple[Manifest, str, UploadReport]:
    """Chunk `image_dir`, upload the chunks the store lacks, then write the signed manifest.

    Chunks the store already has are touched rather than uploaded, so a concurrent GC sees them
    as fresh; the manifest goes up only once every chunk is durable, so a manifest is complete.
    Chunks in `early` (`upload_weights` during the freeze) are durable already: not sent again.
    """
    if not signing_key:
        raise ManifestError("no signing key: set SNAPSCALE_SIGNING_KEY")
    key = manifest_key(deployment, checkpoint_id)
    t0 = time.monotonic()
    scan: ImageScan = await asyncio.to_thread(
        scan_image, image_dir, *(() if chunk_bytes is None else (chunk_bytes,))
    )
    weights, from_files = await asyncio.to_thread(weight_sources, image_dir)
    sources = from_files | scan.sources  # a chunk both in the image and the weights: read the image
    t_scan = time.monotonic()
    new: list[int] = []

    async def ensure(digest: str) -> None:
        read = read_chunk if digest in scan.sources else _read_range
        if n := await _ensure(store, digest, sources[digest], read):
            new.append(n)

    done = early.digests if early is not None else frozenset()
    await run_bounded([d for d in sources if d not in done], ensure, concurrency)
    await pause_point("upload")  # chunks up, no manifest yet
    t_up = time.monotonic()
    since = min(t0, early.started) if early is not None else t0
    if t_up - since > gc_grace_s / 2:
        # A GC could have collected a chunk we only touched at the start; never publish that.
        raise StoreError(
            f"upload took {t_up - since:.0f}s, over half the GC grace period ({gc_grace_s:.0f}s): "
            "retry the freeze"
        )
    early_new, early_chunks = (early.new_bytes, early.new_chunks) if early is not None else (0, 0)
    timings = dict(timings_s or {})
    timings.update(chunk_s=round(t_scan - t0, 4), upload_s=round(t_up - t_scan, 4))
    extra = sum(w.size for w in weights if w.digest not in scan.sources)
    m = Manifest(
        format_version=WEIGHTS_FORMAT_VERSION if weights else FORMAT_VERSION,
        checkpoint_id=checkpoint_id,
        deployment=deployment,
        compat=dict(compat),
        compat_hash=compat_hash,
        chunk_bytes=scan.chunk_bytes,
        files=[FileEntry(f.path, f.size, f.mode, list(f.chunks)) for f in scan.files],
        total_bytes=scan.total_bytes,
        unique_bytes=scan.unique_bytes + extra,
        new_bytes=sum(new) + early_new,
        zero_bytes=scan.zero_bytes,
        created_at=time.time(),
        timings_s=timings,
        weights=weights,
    )
    await store.put_manifest(key, encode_manifest(m, signing_key))
    # Close the window where a GC that listed before our touches deletes after them: check once
    # more now that the manifest protects every chunk, and put back any that went missing.
    repaired = len(new)
    await run_bounded(sources, ensure, concurrency)
    if len(new) != repaired:
        log.warning("checkpoint %s: %d chunks vanished during upload (GC?) and were put back",
                    checkpoint_id, len(new) - repaired)  # fmt: skip
    report = UploadReport(
        total_bytes=m.total_bytes,
        unique_bytes=m.unique_bytes,
        new_bytes=m.new_bytes,
        zero_bytes=m.zero_bytes,
        chunks=len(sources),
        new_chunks=len(new) + early_chunks,
        timings_s=timings,
        weight_bytes=m.weight_bytes,
    )
    log.info(
        "uploaded checkpoint %s of %s: %d bytes, %d unique, %d new, %d zero in %.2fs",
        checkpoint_id, deployment, m.total_bytes, m.unique_bytes, m.new_bytes, m.zero_bytes, t_up - t0,
    )  # fmt: skip
    return m, key, report


async def fetch_manifest(store: ChunkStore, key: str, signing_key: bytes) -> Manifest:
    """The verified manifest at `key`; `NotFoundError` or a `ManifestError` saying why not."""
    return load_manifest(await store.get_manifest(key), signing_key)


@dataclass(frozen=True)
class VerifyReport:
    chunks: int
    bytes_checked: int
    missing: list[str]
    corrupt: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


async def verify_checkpoint(
    store: ChunkStore,
    manifest: Manifest,
    *,
    deep: bool = True,
    concurrency: int = 16,
    on_chunk: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every chunk is in the store (and, if `deep`, hashes to its name). `on_chunk(bytes
    read)` is called as each chunk is done (a progress display)."""
    missing: list[str] = []
    corrupt: list[str] = []
    checked: list[int] = []

    async def one(d: str) -> None:
        n = await check(d)
        if on_chunk is not None:
            on_chunk(n)

    async def check(d: str) -> int:
        if not deep:
            if not await store.touch_chunk(d):
                missing.append(d)
            return 0
        try:
            data = await store.get_chunk(d)
        except NotFoundError:
            missing.append(d)
            return 0
        checked.append(len(data))
        if await asyncio.to_thread(sha256_hex, data) != d:
            corrupt.append(d)
        return len(data)

    await run_bounded(sorted(manifest.digests()), one, concurrency)
    return VerifyReport(len(manifest.digests()), sum(checked), sorted(missing), sorted(corrupt))


@dataclass(frozen=True)
class GcPlan:
    delete: list[str]  # chunk digests to delete
    kept_referenced: int
    kept_young: int  # unreferenced but inside the grace period (maybe a freeze in flight)
    bytes_freed: int


def plan_gc(chunks: Iterable[ObjectInfo], referenced: set[str], *, now: float, grace_s: float) -> GcPlan:
    """Which chunks to delete: unreferenced by any manifest and untouched for `grace_s`.

    A freeze touches or writes every chunk it will reference before writing its manifest, so a
    chunk a freeze in flight needs is always younger than the grace period.
    """
    delete: list[str] = []
    freed = kept_ref = kept_young = 0
    for c in chunks:
        if c.key in referenced:
            kept_ref += 1
        elif now - c.mtime < grace_s:
            kept_young += 1
        else:
            delete.append(c.key)
            freed += c.size
    return GcPlan(delete, kept_ref, kept_young, freed)


async def referenced_chunks(store: ChunkStore, signing_key: bytes) -> set[str]:
    """Digests referenced by every manifest. Any manifest that fails to load stops GC (raises)."""
    refs: set[str] = set()
    for info in await store.list_manifests():
        try:
            m = await fetch_manifest(store, info.key, signing_key)
        except NotFoundError:
            continue  # deleted meanwhile: its chunks are no longer protected by it
        except ManifestError as e:
            raise StoreError(
                f"GC stopped: {info.key} cannot be read ({e.reason}); its chunks are unknown"
            ) from e
        refs |= m.digests()
    return refs


async def collect_garbage(
    store: ChunkStore, signing_key: bytes, *, grace_s: float = DEFAULT_GC_GRACE_S, dry_run: bool = False
) -> GcPlan:
    """Delete chunks no manifest references and nobody touched for `grace_s`."""
    # List chunks before manifests: a chunk written after this listing is not considered at all,
    # and a manifest written after it is still read below.
    chunks = [c async for c in store.list_chunks()]
    refs = await referenced_chunks(store, signing_key)
    plan = plan_gc(chunks, refs, now=time.time(), grace_s=grace_s)
    if plan.delete and not dry_run:
        # A freeze may have touched a candidate since the first listing: list again and delete
        # only what is still old. (A freeze also re-checks its chunks after its manifest lands.)
        fresh = {c.key: c for c in [c async for c in store.list_chunks()]}
        again = plan_gc([fresh[d] for d in plan.delete if d in fresh], refs, now=time.time(), grace_s=grace_s)
        plan = GcPlan(
            again.delete, plan.kept_referenced, plan.kept_young + again.kept_young, again.bytes_freed
        )
        await run_bounded(plan.delete, store.delete_chunk, 16)
    if not dry_run:
        swept = await store.sweep_temp(grace_s)
        if swept:
            log.info("gc: removed %d temp files that crashed writers left", swept)
    log.info(
        "gc: %d chunks deleted (%d bytes), %d referenced, %d young%s",
        len(plan.delete), plan.bytes_freed, plan.kept_referenced, plan.kept_young,
        " (dry run)" if dry_run else "",
    )  # fmt: skip
    return plan
