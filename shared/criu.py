"""Finding the CRIU binary snapscale drives, and checking its version.

Order: SNAPSCALE_CRIU, else the wrapper `scripts/setup` leaves in `.criu/bin/criu`, else `criu`
on PATH if it is at least 4.2 (older ones fail on current kernels or on TCP sockets).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.errors import ConfigError

MIN_VERSION = (4, 2)
_REPO_WRAPPER = Path(__file__).resolve().parent.parent / ".criu" / "bin" / "criu"


@dataclass(frozen=True)
class CriuBinary:
    path: str
    version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", self.version)[:3])


def probe_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"CRIU at {path} does not run: {e}") from None
    m = re.search(r"Version:\s*([0-9.]+)", out.stdout)
    if not m:
        raise ConfigError(f"CRIU at {path} printed no version: {out.stdout.strip()} {out.stderr.strip()}")
    return m.group(1)


def find_criu(configured: str | None = None) -> CriuBinary:
    """The CRIU to use, or a `ConfigError` that says how to get one."""
    if configured:
        return CriuBinary(configured, probe_version(configured))
    if _REPO_WRAPPER.exists():
        return CriuBinary(str(_REPO_WRAPPER), probe_version(str(_REPO_WRAPPER)))
    on_path = shutil.which("criu")
    if on_path:
        b = CriuBinary(on_path, probe_version(on_path))
        if b.version_tuple >= MIN_VERSION:
            return b
        raise ConfigError(
            f"criu on PATH ({on_path}) is {b.version}; snapscale needs >= 4.2. "
            "Run scripts/setup or set SNAPSCALE_CRIU to a CRIU 4.2 wrapper."
        )
    raise ConfigError("no CRIU found: run scripts/setup, or set SNAPSCALE_CRIU to a CRIU >= 4.2 binary")
