"""Typed errors shared by every service. Each says what went wrong and, where it can, what to do.

`RetryableError` means the same action may succeed later; anything else is permanent.
"""

from __future__ import annotations


class SnapscaleError(Exception):
    """Base of every error snapscale raises on purpose."""


class RetryableError(SnapscaleError):
    """The same action may succeed later (a server unreachable, a lease held by another)."""

    def __init__(self, message: str, *, delay_s: float = 1.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class ConfigError(SnapscaleError):
    """A setting or deployment spec is missing or malformed; fix the configuration."""


class MessageError(SnapscaleError):
    """A message on the wire could not be decoded. `field` names where, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"malformed message: {field}: {reason}")
        self.field = field
        self.reason = reason


class UnavailableError(RetryableError):
    """A server this needs cannot be reached, or lacks what it needs (NATS without JetStream)."""


class NotFoundError(SnapscaleError):
    """What was named (a deployment, replica, host, checkpoint) does not exist."""
