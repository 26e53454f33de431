"""Helpers for the engine tests: sample-sandbox specs and finding a test's own processes."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import replace
from pathlib import Path

from examples import sample_server
from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec

ROOT = Path(__file__).resolve().parents[1]


def sample_spec(
    name: str,
    *,
    tag: str,
    preset: str = "tiny",
    weights: Path | None = None,
    hooks: HooksSpec | None = None,
    ready: ReadySpec | None = None,
    command: list[str] | None = None,
) -> DeploymentSpec:
    cmd = command or sample_server.command(preset, weights=weights, tag=tag)
    spec = DeploymentSpec(
        name=name,
        command=cmd,
        cwd=str(ROOT),
        hooks=hooks
        or HooksSpec(
            before_freeze="/hooks/before_freeze", after_restore="/hooks/after_restore", timeout_s=10.0
        ),
        ready=ready or ReadySpec(http_path="/healthz", timeout_s=60.0, interval_s=0.05),
    )
    return replace(spec)


def procs_with(tag: str) -> list[int]:
    """Live PIDs whose command line holds `tag` (restored trees keep their command line)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if tag.encode() in (p / "cmdline").read_bytes():
                stat = (p / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    out.append(int(p.name))
        except OSError:
            continue
    return out


def kill_tagged(tag: str) -> None:
    for pid in procs_with(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def read_text(path: str | Path) -> str:
    return Path(path).read_text()
