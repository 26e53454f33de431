"""Why each rerun test failed the first time, at the end of a pytest run (used by conftest.py).

pytest-rerunfailures only counts reruns; a flake that passes on its rerun would otherwise leave no
trace of its first failure in the CI log."""

from __future__ import annotations

import pytest


def first_failures(terminalreporter: pytest.TerminalReporter, tail_lines: int = 40) -> None:
    reruns = terminalreporter.stats.get("rerun", [])
    if not reruns:
        return
    terminalreporter.section("first failures of rerun tests")
    for r in reruns:
        text = getattr(r, "longreprtext", "") or str(getattr(r, "longrepr", ""))
        terminalreporter.write_line(f"{r.nodeid}:")
        for line in text.splitlines()[-tail_lines:]:
            terminalreporter.write_line(f"    {line}")
