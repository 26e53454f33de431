"""The progress display: one line redrawn on a terminal and erased at the end; plain, sparse lines
elsewhere, none at all for quick work. Time is a parameter."""

from __future__ import annotations

import io

import pytest

from snapscale.cli.progress import ERASE, PLAIN_EVERY_S, Display, render
from snapscale.client import Progress


@pytest.mark.parametrize(
    ("p", "elapsed", "text"),
    [
        (
            Progress("prefetch ck-1 to h1", 1.5 * 2**30, 3 * 2**30, "B"),
            4.12,
            "prefetch ck-1 to h1: 1.5GiB of 3.0GiB (50%), 4.1s",
        ),
        (Progress("traffic llm", 12, 40, "events"), 3.0, "traffic llm: 12 of 40 events (30%), 3.0s"),
        (Progress("freezing llm/r1 on h1", 12.4, None, "s"), 12.4, "freezing llm/r1 on h1: 12s"),
        (
            Progress("undeploy x: releasing replicas", 0, 0, "replicas"),
            0.01,
            "undeploy x: releasing replicas: 0 replicas, 0.0s",
        ),
        (Progress("waiting", 1, None, ""), 125.0, "waiting: 1, 125s"),
    ],
)
def test_render(p: Progress, elapsed: float, text: str) -> None:
    assert render(p, elapsed) == text


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_terminal_gets_one_line_redrawn_and_erased() -> None:
    out, clock = io.StringIO(), Clock()
    show = Display(out, tty=True, clock=clock)
    for i in range(5):
        show(Progress("traffic d", i, 4, "events"))
        clock.t += 0.06  # faster than the redraw rate: every other update is drawn
    show.close()
    text = out.getvalue()
    assert text.count(ERASE) == 4 and "\n" not in text  # 3 draws and the final erase
    assert text.endswith(ERASE) and "traffic d: 0 of 4 events" in text


def test_a_log_gets_plain_lines_only_once_the_work_is_slow() -> None:
    out, clock = io.StringIO(), Clock()
    quick = Display(out, tty=False, clock=clock)
    quick(Progress("traffic d", 1, 4, "events"))
    clock.t += 1.0
    quick(Progress("traffic d", 4, 4, "events"))
    quick.close()
    assert out.getvalue() == ""  # quick work: nothing on stderr
    slow = Display(out, tty=False, clock=clock)
    for _ in range(4):
        clock.t += PLAIN_EVERY_S / 2
        slow(Progress("freezing d/r on h", clock.t - slow.t0, None, "s"))
    slow.close()
    assert out.getvalue().splitlines() == ["freezing d/r on h: 5.0s", "freezing d/r on h: 10s"]
