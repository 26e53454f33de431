"""The workload library's errors: each names the field or step and says why, so a hook can answer
with it and an operator can act on it. Standard library only (the sandbox imports this)."""

from __future__ import annotations


class WeightsError(Exception):
    """Weights could not be loaded, released or filled back. `where` names the field or step."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


class NoVmmError(WeightsError):
    """No CUDA driver with virtual memory management here (libcuda absent, or no VMM support)."""


class ProtocolError(WeightsError):
    """A hook body this library cannot act on: the caller's mistake (an HTTP 400), not the weights'."""
