"""The sample sandbox: a small decoder served over HTTP (`server.py`), its weights outside the image."""

from __future__ import annotations

import sys
from pathlib import Path


def command(preset: str, *, weights: Path | None = None, tag: str = "", kv_mib: int = 8) -> list[str]:
    """The sample server on port 8000 under this interpreter, run from the repository root; `tag`
    rides on its command line so a test finds its processes (restored trees keep it)."""
    cmd = [sys.executable, "-m", "examples.sample_server.server", "--preset", preset, "--port", "8000"]
    cmd += ["--kv-mib", str(kv_mib)]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    return cmd + (["--tag", tag] if tag else [])
