"""The end-of-run section that keeps a flaky test's first failure in the CI log."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

FLAKY = """
import os
def test_flaky(tmp_path_factory):
    flag = tmp_path_factory.getbasetemp().parent / "failed-once"
    if not flag.exists():
        flag.write_text("x")
        assert 1 == 2, "the first attempt fails"
"""


def test_a_rerun_tests_first_failure_is_shown(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import rerun_report\n"
        "def pytest_terminal_summary(terminalreporter):\n"
        "    rerun_report.first_failures(terminalreporter)\n"
    )
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_flaky=FLAKY)
    result = pytester.runpytest("--reruns", "1")
    assert result.parseoutcomes() == {"passed": 1, "rerun": 1}
    result.stdout.fnmatch_lines(
        ["*first failures of rerun tests*", "*test_flaky*", "*the first attempt fails*"]
    )
