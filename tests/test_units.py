"""One unit style: durations as seconds with a unit, sizes in IEC, read and printed alike."""

from __future__ import annotations

import pytest

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("2m", 120.0), ("500ms", 0.5), ("1.5", 1.5), (" 1h ", 3600.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "s", "-1s", "3 weeks", "1e3"])
def test_parse_duration_refuses(bad: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "0.25s"), (5.5, "5.5s"), (42.0, "42s"), (90.0, "90s"), (900.0, "15m"), (3600.0, "1h")],
)
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "n"),
    [("4096", 4096), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5 KiB", 1536), ("3gib", 3 << 30)],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(("bad", "why"), [("2GB", "decimal; say GiB"), ("lots", "IEC"), ("-1MiB", "IEC")])
def test_parse_size_refuses(bad: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_size(bad)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (1023, "1023B"), (1536, "1.5KiB"), (2_523_000_000, "2.3GiB"), (5 << 40, "5.0TiB")],
)
def test_format_size_is_iec_and_reads_back(n: int, text: str) -> None:
    assert format_size(n) == text
    assert abs(parse_size(text) - n) <= n / 20
