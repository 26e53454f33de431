"""runc's command lines (pure) and running them. State under /run/snapscale-runc, CRIU given by
`--criu` (runc drives it over its RPC socket, `criu swrk`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from snapscale.shared.engine.errors import CriuError, EngineError

STATE_ROOT = "/run/snapscale-runc"
_VERBS = ("run", "checkpoint", "restore", "delete", "state", "pause", "resume")


def runc_path() -> str:
    return shutil.which("runc") or "runc"


def _base(runc: str, criu: str | None = None) -> list[str]:
    return [runc, "--root", STATE_ROOT, *(["--criu", criu] if criu else [])]


def run_argv(runc: str, cid: str, bundle: Path, pidfile: Path) -> list[str]:
    return [*_base(runc), "run", "--detach", "--bundle", str(bundle), "--pid-file", str(pidfile), cid]


def checkpoint_argv(
    runc: str, criu: str, cid: str, image_dir: Path, work_dir: Path, *, leave_running: bool
) -> list[str]:
    """Established TCP connections are dumped with their repair state (`--tcp-established`), as
    the host sandbox's are (engine/criu.py): the engine then closes, in the image, those that
    leave the sandbox (tcpimg.py). No network lock: the bundle's CRIU config says `network-lock
    skip` (oci/config.py CRIU_OPTIONS)."""
    argv = [
        *_base(runc, criu), "checkpoint", "--tcp-established",
        "--image-path", str(image_dir), "--work-path", str(work_dir),
    ]  # fmt: skip
    if leave_running:
        argv.append("--leave-running")
    return [*argv, cid]


def restore_argv(
    runc: str, criu: str, cid: str, bundle: Path, image_dir: Path, work_dir: Path, pidfile: Path
) -> list[str]:
    """The image's connections left after the dump's rewrite are loopback ones: restored
    established (`--tcp-established`), into the fresh netns runc joins by the bundle's path."""
    return [
        *_base(runc, criu), "restore", "--detach", "--tcp-established", "--image-path", str(image_dir),
        "--work-path", str(work_dir), "--bundle", str(bundle), "--pid-file", str(pidfile), cid,
    ]  # fmt: skip


def pause_argv(runc: str, cid: str, *, pause: bool) -> list[str]:
    """Freeze (`pause`) or thaw (`resume`) the container's cgroup."""
    return [*_base(runc), "pause" if pause else "resume", cid]


def delete_argv(runc: str, cid: str) -> list[str]:
    return [*_base(runc), "delete", "--force", cid]


async def call(
    argv: list[str], step: str, *, stdio: tuple[int, int, int] | None = None, log: Path | None = None
) -> float:
    """Run runc; its stdio is `stdio` (the container inherits it on run/restore), else captured."""
    start = time.monotonic()
    if stdio is None:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    else:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        await proc.wait()
        out, err = b"", b""
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = (out + err).decode(errors="replace")[-2000:]
        if log is not None:
            tail += "\n" + _criu_errors(log)
        cls = CriuError if step.startswith("criu") else EngineError
        verb = next((a for a in argv if a in _VERBS), "")
        raise cls(step, f"runc {verb} exited {proc.returncode}", tail.strip())
    return seconds


def _criu_errors(log: Path, limit: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln][-limit:])


async def tool(*argv: str, step: str) -> None:
    """Run a helper (mount, tar, skopeo, umoci); its output is the error's detail when it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise EngineError(step, f"{argv[0]} exited {proc.returncode}", out.decode(errors="replace")[-2000:])


async def state(runc: str, cid: str) -> dict[str, Any] | None:
    proc = await asyncio.create_subprocess_exec(
        *_base(runc), "state", cid, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        return None
    d = json.loads(out)
    return d if isinstance(d, dict) else None
