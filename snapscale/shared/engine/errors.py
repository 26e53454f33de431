"""Typed errors of the freeze/restore engine: which step failed, why, and the sandbox's last log lines.

Kept apart from engine.py so the launcher, probes and drivers can raise them without import cycles.
"""

from __future__ import annotations

from snapscale.shared.core.errors import SnapscaleError


class EngineError(SnapscaleError):
    """A sandbox step failed. `step` names it (launch, ready, criu_dump, ...), `log_tail` helps debug."""

    def __init__(self, step: str, reason: str, log_tail: str = "") -> None:
        msg = f"{step}: {reason}"
        if log_tail:
            msg += f"\n--- last log lines ---\n{log_tail}"
        super().__init__(msg)
        self.step = step
        self.reason = reason
        self.log_tail = log_tail


class CriuError(EngineError):
    """CRIU dump or restore failed; `log_tail` holds CRIU's last error lines."""


class CudaError(EngineError):
    """A CUDA checkpoint call failed; `reason` carries the CUresult name."""

    def __init__(self, step: str, reason: str, log_tail: str = "", *, code: int = -1) -> None:
        super().__init__(step, reason, log_tail)
        self.code = code


class NoCudaError(CudaError):
    """No usable CUDA driver on this host (libcuda absent or too old for the checkpoint API)."""


class HookError(EngineError):
    """A before_freeze / after_restore hook failed or missed its deadline."""


class ReadyTimeout(EngineError):
    """The readiness probe did not pass before its deadline."""


class SandboxExited(EngineError):
    """The sandbox's process tree is gone (it crashed or was killed)."""


# What CRIU says when a sandbox holds something it cannot capture -> the name an operator sees
# ("cannot be frozen: <name>") and the freezer's failure metric counts by (a bounded set).
_CRIU_REFUSALS = (
    ("External socket is used", "external-unix-socket"),
    ("Can't dump half of stream unix connection", "external-unix-socket"),
    ("Can't dump name-less external socket", "external-unix-socket"),
    ("Connected TCP socket", "tcp-connection"),
    ("Unknown inet socket", "tcp-socket-state"),
    ("In-flight connection", "unix-in-flight-connection"),
    ("Unsupported type", "socket-type"),
    ("has bad size", "file-changed"),
    ("Can't dump", "criu-unsupported"),
)


def refusal(e: EngineError) -> str:
    """The named reason a freeze failed: what the sandbox holds that CRIU refused, else the step
    that failed (before_freeze, cuda_checkpoint, criu_dump...). Pure; a bounded set of names."""
    if isinstance(e, CriuError):
        text = f"{e.reason}\n{e.log_tail}"
        for needle, name in _CRIU_REFUSALS:
            if needle in text:
                return name
    return e.step.replace("_", "-")
