"""How a restorer failure reads to an operator, and the restorer's own failures that reach one.

A scale-up's failure becomes the FAILED event's reason and a prefetch's its ledger outcome: one
line that says which step broke and why, never a traceback, and never CRIU's boilerplate.
"""

from __future__ import annotations

from snapscale.shared.core.errors import ConfigError, SnapscaleError
from snapscale.shared.engine import CriuError, EngineError
from snapscale.shared.store import RetryableStoreError


class DeploymentUnknownError(ConfigError):
    """The command names a deployment KV `deployments` does not hold."""


class ColdBootError(EngineError):
    """The last tier failed too; the message has why faster tiers were passed over."""

    def __init__(self, earlier: str, reason: str) -> None:
        super().__init__("cold_boot", f"{reason} (after: {earlier})" if earlier else reason)


# printed on every CRIU run here, or by every failed one: neither says what broke
_CRIU_NOISE = ("RLIMIT_NOFILE", "Restoring FAILED", "Dumping FAILED")


def criu_cause(log_tail: str) -> str:
    """The line of CRIU's error output that says what broke (the last one that is not noise)."""
    lines = [ln.strip() for ln in log_tail.strip().splitlines() if ln.strip()]
    telling = [ln for ln in lines if not any(n in ln for n in _CRIU_NOISE)]
    return (telling or lines or [""])[-1]


def describe(e: BaseException) -> str:
    """One line an operator can act on, for a failure anywhere in a scale-up."""
    if isinstance(e, CriuError) and e.log_tail.strip():
        return f"{e.step}: {e.reason}: {criu_cause(e.log_tail)[:240]}"
    if isinstance(e, EngineError):
        return f"{e.step}: {e.reason}"
    if isinstance(e, RetryableStoreError):  # retried already: the store is down or cut off from here
        return f"store unreachable: {e}"
    name = type(e).__name__
    if isinstance(e, TimeoutError):
        return f"timed out ({e})" if str(e) else "timed out"
    if isinstance(e, SnapscaleError):
        return f"{name}: {e}"
    return f"{name}: {e}" if str(e) else name
