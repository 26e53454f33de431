"""libcuda over ctypes: the loading and the error names that the workload's VMM calls (`vmm.py`) and
the engine's checkpoint calls (`snapscale/shared/engine/cuda.py`) share. Standard library only (the
sandbox imports this); each user says in `_check` which error a failed call raises.
"""

from __future__ import annotations

import ctypes
from typing import Any

LIBCUDA = "libcuda.so.1"
CUDA_SUCCESS = 0


class LibcudaMissing(Exception):
    """No usable libcuda here: it cannot be loaded, or lacks the call asked for (the message says)."""


def load_library(name: str, needs: str, lacking: str) -> Any:
    """libcuda `name` loaded; `LibcudaMissing` unless it has the call `needs` (`lacking` says why not)."""
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise LibcudaMissing(f"no CUDA: {name} cannot be loaded ({e})") from None
    if not hasattr(lib, needs):
        raise LibcudaMissing(lacking)
    return lib


class Driver:
    """One loaded libcuda, initialised (cuInit); takes any object with libcuda's functions, so call
    sequences are tested without a GPU."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._check("cuInit", lib.cuInit(0))

    def _check(self, what: str, code: int) -> None:
        """Raise the user's error for a `code` other than CUDA_SUCCESS."""
        raise NotImplementedError

    def error_name(self, code: int) -> str:
        """The CUresult's name (CUDA_ERROR_...), or `CUresult <code>` where the driver has none."""
        ptr = ctypes.c_char_p()
        if self._lib.cuGetErrorName(code, ctypes.byref(ptr)) != CUDA_SUCCESS or ptr.value is None:
            return f"CUresult {code}"
        return ptr.value.decode()
