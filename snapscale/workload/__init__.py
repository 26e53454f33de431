"""A library for workloads: weights kept outside the checkpoint.

A workload loads its weights with `Weights.load`, releases them in its before_freeze hook and gets
them back in its after_restore hook (`hooks` is the protocol with the engine; docs/weights.md).
Imports only the standard library and, for `Weights`, torch: a sandbox needs nothing else of
snapscale. `record` and `hooks` are what the engine, freezer and restorer read too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from snapscale.workload.errors import NoVmmError, WeightsError
from snapscale.workload.hooks import ChunkDir, FdHandover, FillSource, SourceFiles
from snapscale.workload.record import WeightsRecord

if TYPE_CHECKING:
    from snapscale.workload.weights import Weights

__all__ = [
    "ChunkDir",
    "FdHandover",
    "FillSource",
    "NoVmmError",
    "SourceFiles",
    "Weights",
    "WeightsError",
    "WeightsRecord",
]


def __getattr__(name: str) -> Any:
    # `Weights` imports torch: only when asked for, so the engine can read records without it.
    if name == "Weights":
        from snapscale.workload.weights import Weights

        return Weights
    raise AttributeError(name)
