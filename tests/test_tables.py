"""The one table printer (snapscale.shared.core.tables) that the demo, `snapscale status` and the
e2e bench share. Pure."""

from __future__ import annotations

import pytest

from snapscale.shared.core.tables import table


def test_columns_line_up_and_the_last_one_stays_ragged() -> None:
    rows = [("1", "cold", "launch 0.14s  ready_probe 7.47s"), ("2", "cache", "")]
    text = table(("#", "tier", "phases"), rows)
    assert text.splitlines() == [
        "#  tier   phases",
        "1  cold   launch 0.14s  ready_probe 7.47s",
        "2  cache",  # no trailing spaces, though the row's last cell is empty
    ]


def test_a_rule_under_the_headers_as_wide_as_each_column() -> None:
    lines = table(("#", "scale-up", "phases"), [("10", "from zero", "x")], rule=True).splitlines()
    assert lines[1] == "--  ---------  ------"
    assert lines[2] == "10  from zero  x"


def test_indent_and_what_an_empty_table_prints() -> None:
    assert table(("HOST", "KEY"), [("h1", "abc")], indent="  ") == "  HOST  KEY\n  h1    abc"
    assert table(("HOST", "KEY"), [], indent="  ", empty="(none)") == "  (none)"
    assert table(("HOST", "KEY"), [], rule=True) == "HOST  KEY\n----  ---"


def test_a_row_that_does_not_fit_the_headers_is_refused() -> None:
    with pytest.raises(ValueError, match="2 cells under 3 headers"):
        table(("a", "b", "c"), [("1", "2")])
