"""A real CRIU image directory for store tests: dump a small Python process once per session.

The process holds random bytes (unique chunks), zeros (zero chunks) and a repeated block (dedup).
"""

from __future__ import annotations

import time
from pathlib import Path

from criu_procs import criu_dump, python_child

from snapscale.shared.engine.criu import CriuBinary

CHILD = r"""
import os, sys, time
rand = bytearray(os.urandom(6 << 20))
zeros = bytearray(8 << 20)
for i in range(0, len(zeros), 4096):
    zeros[i] = 0  # touch every page so CRIU dumps them: zero chunks in the image
block = os.urandom(1 << 20) * 6
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(1)
"""


def dump_image(criu: CriuBinary, work: Path) -> Path:
    """Dump (and so end) a fresh child; the image dir it returns holds only CRIU's files."""
    ready = work / "ready"
    images = work / "images"
    images.mkdir(parents=True)
    with python_child(CHILD, str(ready)) as (child, _pids):
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("child never got ready")
            time.sleep(0.02)
        criu_dump(criu, child.pid, images, log=work / "dump.log")  # the image dir: CRIU's files only
    return images
