"""One unit style for what operators type and read: durations are seconds with a unit (`30s`,
`2m`, `500ms`, `1h`), sizes are IEC (`512MiB`, `2.3GiB`), in flags and in output alike.

Pure: text in, numbers out, and back. A bad value is a `ConfigError` naming what was expected.
"""

from __future__ import annotations

import math
import re
import time

from snapscale.shared.core.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_IEC = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_BYTES = {u.lower(): 1 << (10 * i) for i, u in enumerate(_IEC)}


def parse_duration(text: str) -> float:
    """`30s`, `2m`, `500ms`, `1h` or a bare number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"duration {text!r}: use e.g. 30s, 2m, 500ms")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def format_duration(seconds: float) -> str:
    """Seconds with a unit, as `parse_duration` reads them back: `0.25s`, `42s`, `15m`, `2h`."""
    if not math.isfinite(seconds):
        return f"{seconds}s"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:.3g}s" if seconds < 10 else f"{seconds:.0f}s"


def parse_size(text: str) -> int:
    """`512MiB`, `2GiB`, `4096` (bytes). Decimal units (MB, GB) are refused: they are not what
    the output prints, and 1 GB is not 1 GiB."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"size {text!r}: use IEC units, e.g. 512MiB, 2GiB, or a number of bytes")
    unit = (m.group(2) or "B").lower()
    if unit not in _BYTES:
        raise ConfigError(f"size {text!r}: {m.group(2)} is decimal; say {m.group(2)[0].upper()}iB")
    return int(float(m.group(1)) * _BYTES[unit])


def format_size(n: float) -> str:
    """IEC, one decimal past KiB, no space (a table cell, and what `parse_size` reads back):
    `512B`, `1.5KiB`, `2.3GiB`."""
    if n < 1024:
        return f"{n:.0f}B"
    for i, unit in enumerate(_IEC[1:], start=1):
        if n < 1 << (10 * (i + 1)) or unit == _IEC[-1]:
            return f"{n / (1 << (10 * i)):.1f}{unit}"
    raise AssertionError("unreachable")


def format_time(ts: float) -> str:
    """A wall-clock time (seconds since the epoch) as operators read it: `2026-12-04 18:03:44 UTC`."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
