"""Declared limits on decoded fields: `Annotated[str, Token(64)]`, `Annotated[float, Range(0, 1e6)]`.

wire.py's decoder checks every limit a field declares, so a message kind is validated in one
place (its type) before any handler sees it; schema.py writes the same limits into the JSON
Schema, so a gateway in another language checks what the services check. Pure, no I/O.

A refusal says why without echoing the value (it may be hundreds of KB): `shown` clips it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

TOKEN_PATTERN = "^[A-Za-z0-9_-]+$"
_TOKEN = re.compile(TOKEN_PATTERN)
SHOWN_CHARS = 40


def shown(value: object) -> str:
    """`repr(value)`, clipped: what an error message may quote of a value off the wire."""
    r = repr(value)
    return r if len(r) <= SHOWN_CHARS else f"{r[:SHOWN_CHARS]}... ({len(r)} characters)"


class Limit(Protocol):
    def problem(self, value: Any) -> str | None:
        """Why `value` (already of the field's base type) is refused; None when it is fine."""

    def schema(self) -> dict[str, Any]:
        """The JSON Schema keywords that say the same."""


@dataclass(frozen=True)
class Token:
    """A name that becomes a NATS subject token, part of a KV key and a file name: 1 to `max_len`
    of [A-Za-z0-9_-]. No dot (splits a subject or a KV key), no slash (leaves a directory), no
    wildcard or space; bounded, as the server closes a connection whose protocol line is too long."""

    max_len: int
    empty: bool = False  # "" allowed: a field that may name nothing

    def problem(self, value: str) -> str | None:
        if not value:
            return None if self.empty else "must not be empty"
        if len(value) > self.max_len:
            return f"{len(value)} characters, over the limit of {self.max_len}"
        if not _TOKEN.match(value):
            return (
                f"{shown(value)} must match [A-Za-z0-9_-]+ (it becomes a NATS subject token, "
                "a KV key and a file name)"
            )
        return None

    def schema(self) -> dict[str, Any]:
        if self.empty:
            return {"pattern": TOKEN_PATTERN.replace("+", "*"), "maxLength": self.max_len}
        return {"pattern": TOKEN_PATTERN, "minLength": 1, "maxLength": self.max_len}


@dataclass(frozen=True)
class Text:
    """Free text (a reason, an endpoint) of at most `max_len` characters."""

    max_len: int

    def problem(self, value: str) -> str | None:
        if len(value) > self.max_len:
            return f"{len(value)} characters, over the limit of {self.max_len}"
        return None

    def schema(self) -> dict[str, Any]:
        return {"maxLength": self.max_len}


@dataclass(frozen=True)
class Range:
    """A number within [lo, hi]. (Every decoded float is finite; this bounds the absurd ones.)"""

    lo: float
    hi: float

    def problem(self, value: float) -> str | None:
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if not self.lo <= value <= self.hi:
            return f"must be within [{self.lo:g}, {self.hi:g}], got {value:g}"
        return None

    def schema(self) -> dict[str, Any]:
        lo, hi = (int(x) if float(x).is_integer() else x for x in (self.lo, self.hi))
        return {"minimum": lo, "maximum": hi}
