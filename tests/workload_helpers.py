"""Helpers for the weights tests: the host cache's share of a weights record, made by hand."""

from __future__ import annotations

from pathlib import Path

from snapscale.workload.record import WeightsRecord


def chunk_dir(r: WeightsRecord, dest: Path) -> Path:
    """One file per distinct non-zero chunk of `r`, named by its digest, as the host cache holds them."""
    dest.mkdir(parents=True, exist_ok=True)
    for d, src in r.sources().items():
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            (dest / d).write_bytes(f.read(src.length))
    return dest
