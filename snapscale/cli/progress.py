"""The progress display of long verbs (`freeze`, `prefetch`, `traffic --for`, `undeploy`, `wait`,
`checkpoints verify`), on stderr so stdout keeps only the answer.

On a terminal: one line, rewritten in place at most 10 times a second and erased at the end. Not
on a terminal (a log, CI): a plain line every PLAIN_EVERY_S once the work has taken that long, no
control characters, so quick work leaves stderr empty. `render` is pure.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from snapscale.client import Progress
from snapscale.shared.core.units import format_duration, format_size

TTY_EVERY_S = 0.1
PLAIN_EVERY_S = 5.0
ERASE = "\r\x1b[2K"


def render(p: Progress, elapsed_s: float) -> str:
    """`prefetch ck-1 to gpu-01: 1.2GiB of 2.3GiB (52%), 4.1s`; time alone for work that says
    nothing until it is done (`freezing llm/r1 on gpu-01: 12s`)."""
    if p.unit == "s":
        return f"{p.what}: {_elapsed(p.done)}"
    fmt: Callable[[float], str] = format_size if p.unit == "B" else lambda n: f"{n:.0f}"
    unit = "" if p.unit in ("B", "") else f" {p.unit}"
    if p.total:
        pct = f" ({100 * p.done / p.total:.0f}%)"
        return f"{p.what}: {fmt(p.done)} of {fmt(p.total)}{unit}{pct}, {_elapsed(elapsed_s)}"
    return f"{p.what}: {fmt(p.done)}{unit}, {_elapsed(elapsed_s)}"


def _elapsed(s: float) -> str:
    return f"{s:.1f}s" if s < 10 else format_duration(round(s))


class Display:
    """Called with each `Progress`; `close()` when the work is over (erases a terminal line)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.t0 = clock()
        self._shown_at: float | None = None
        self._drawn = False

    def __call__(self, p: Progress) -> None:
        now = self.clock()
        every = TTY_EVERY_S if self.tty else PLAIN_EVERY_S
        if self._shown_at is not None:
            if now - self._shown_at < every:
                return
        elif not self.tty and now - self.t0 < every:
            return  # a log hears of work only once it is slow
        self._shown_at = now
        line = render(p, now - self.t0)
        if self.tty:
            self.stream.write(ERASE + line)
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write(ERASE)
            self.stream.flush()
            self._drawn = False
