"""Pause points, for fault injection on the real services (tests/test_faults.py).

With `SNAPSCALE_PAUSE_AT=<point>:<flag file>` in its environment, a service that reaches the
named point of its work creates the flag file and waits there (an hour), so that a test can
SIGKILL it at a known phase instead of guessing with sleeps. Points: `prefetch`, `materialize`,
`criu_restore`, `after_restore` (a restore), `criu_dump`, `upload` (a freeze). Without the
variable, which is never set outside tests, a pause point is one environment lookup.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

ENV = "SNAPSCALE_PAUSE_AT"
WAIT_S = 3600.0

log = logging.getLogger(__name__)


def wanted(point: str, setting: str | None) -> Path | None:
    """The flag file to create when `setting` (the variable's value) names `point`; else None. Pure."""
    if not setting:
        return None
    name, sep, flag = setting.partition(":")
    if name != point or not sep or not flag:
        return None
    return Path(flag)


async def pause_point(point: str) -> None:
    """Wait here when the environment asks for it (see the module's doc); else return at once."""
    flag = wanted(point, os.environ.get(ENV))
    if flag is None:
        return
    log.warning("paused at %s (%s): waiting to be killed", point, ENV)
    flag.touch()
    await asyncio.sleep(WAIT_S)
