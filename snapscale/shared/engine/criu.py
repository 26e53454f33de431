"""The CRIU driver: find the binary and check its version, dump and restore a sandbox's tree, read stats.

Order: SNAPSCALE_CRIU, else the wrapper `scripts/setup` leaves in `.criu/bin/criu`, else `criu`
on PATH if it is at least 4.2 (older ones fail on current kernels or on TCP sockets).
Knows nothing about sandboxes or CUDA: callers pass PIDs, fds and paths.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import protowire
from snapscale.shared.engine.errors import CriuError

log = logging.getLogger(__name__)

MIN_VERSION = (4, 2)
_REPO_WRAPPER = Path(__file__).resolve().parents[3] / ".criu" / "bin" / "criu"


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


def require_version(b: CriuBinary) -> None:
    """Older CRIU fails on this kernel or on listening TCP sockets (FACTS.md); refuse it up front."""
    if b.version_tuple < MIN_VERSION:
        raise ConfigError(f"CRIU {b.version} at {b.path} is too old; snapscale needs >= 4.2")


EXTNET_KEY = "extnet"  # the name the sandbox's netns goes by in an image (`--external net[..]:extnet`)
# CRIU prints this on every run here; it is harmless (FACTS.md).
_NOISE = ("RLIMIT_NOFILE",)

_DUMP_FIELDS = {
    1: "freezing_time_us",
    2: "frozen_time_us",
    3: "memdump_time_us",
    4: "memwrite_time_us",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    9: "pages_lazy",
}
_RESTORE_FIELDS = {
    1: "pages_compared",
    2: "pages_skipped_cow",
    3: "forking_time_us",
    4: "restore_time_us",
    5: "pages_restored",
}


@dataclass(frozen=True)
class CriuRun:
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)
    pid: int = 0  # restore: host PID of the restored root


def parse_stats(data: bytes) -> dict[str, int]:
    """CRIU's `stats-dump`/`stats-restore` image: two magics, a u32 size, a StatsEntry. Pure."""
    if len(data) < 12:
        raise ValueError("stats image too short")
    (size,) = struct.unpack_from("<I", data, 8)
    entry = dict(protowire.fields(data[12 : 12 + size]))
    out: dict[str, int] = {}
    for num, names in ((1, _DUMP_FIELDS), (2, _RESTORE_FIELDS)):
        sub = entry.get(num)
        if isinstance(sub, bytes):
            for k, v in protowire.fields(sub):
                if k in names and isinstance(v, int):
                    out[names[k]] = v
    return out


def read_stats(image_dir: Path, which: str) -> dict[str, int]:
    try:
        return parse_stats((image_dir / f"stats-{which}").read_bytes())
    except (OSError, ValueError) as e:
        log.debug("no CRIU %s stats in %s: %s", which, image_dir, e)
        return {}


def error_lines(log_path: Path, limit: int = 8) -> str:
    """CRIU's last error lines (else its last lines), for the exception a caller sees."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no CRIU log at {log_path})"
    lines = [ln for ln in lines if not any(n in ln for n in _NOISE)]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return "\n".join((errors or lines)[-limit:])


def dump_argv(
    b: CriuBinary,
    pid: int,
    image_dir: Path,
    *,
    netns_inode: int,
    leave_running: bool,
    log_path: Path,
    external_files: Sequence[str] = (),
) -> list[str]:
    """Pure. The netns stays outside the image (a restore gets a fresh one); `--network-lock skip`:
    no dependency on iptables or nftables rules. Established TCP connections are dumped with their
    repair state (`--tcp-established`; tcpimg.py then closes the ones that leave the sandbox); with
    no lock, a loopback segment in flight at the instant of the dump is the one thing at risk.
    The sandbox's mounts are copies of the host's: `--external mnt[]` records them as external
    instead of dumping them (tmpfs contents included). `external_files` are CRIU's keys of files
    held from outside the sandbox's mount namespace (extfiles.py), dumped by key, not by path."""
    argv = [
        b.path,
        "dump",
        "-t",
        str(pid),
        "-D",
        str(image_dir),
        "-o",
        str(log_path),
        "-v2",
        "--external",
        f"net[{netns_inode}]:{EXTNET_KEY}",
        "--network-lock",
        "skip",
        "--skip-in-flight",
        "--tcp-established",
        "--external",
        "mnt[]",
    ]
    for key in external_files:
        argv += ["--external", key]
    if leave_running:
        argv.append("--leave-running")
    return argv


def restore_argv(
    b: CriuBinary,
    image_dir: Path,
    *,
    inherit: Mapping[str, int],
    log_path: Path,
    pidfile: Path,
    log_level: int = 2,
) -> list[str]:
    """Pure. Detached (`-d`): the tree outlives CRIU. `inherit` maps image resource keys to our fds.
    The sandbox's mount namespace is rebuilt on the host's root, its external mounts bound back from
    the same host paths (`--root / --ext-mount-map auto`). The image's TCP connections left are
    loopback ones (tcpimg.py), restored established, no lock (see `dump_argv`). `log_level` 4
    timestamps every step (criu_profile.py reads it); 2, errors only, costs nothing. CRIU's work
    dir (its `stats-restore`) is the log's dir, the replica's own: several restores may read one
    image dir at once (a hot image), and one's stats must not be read while another writes them."""
    argv = [
        b.path,
        "restore",
        "-d",
        "-D",
        str(image_dir),
        "-W",
        str(log_path.parent),
        "-o",
        str(log_path),
        f"-v{log_level}",
        "--pidfile",
        str(pidfile),
        "--root",
        "/",
        "--ext-mount-map",
        "auto",
        "--tcp-established",
        "--network-lock",
        "skip",
    ]
    for key, fd in inherit.items():
        argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
    return argv


async def _run(argv: list[str], step: str, log_path: Path, pass_fds: tuple[int, ...] = ()) -> float:
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=pass_fds,
    )
    out, _ = await proc.communicate()
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = error_lines(log_path)
        if not tail.strip() or tail.startswith("(no CRIU log"):
            tail = out.decode(errors="replace")[-2000:]
        raise CriuError(step, f"criu {argv[1]} exited {proc.returncode} (log {log_path})", tail)
    return seconds


async def dump(b: CriuBinary, argv: list[str], image_dir: Path, log_path: Path) -> CriuRun:
    """Run a dump `dump_argv` made into `image_dir` (logging to `log_path`). Without
    `leave_running` there, CRIU kills the tree."""
    require_version(b)
    _mkdir(image_dir)
    seconds = await _run(argv, "criu_dump", log_path)
    return CriuRun(seconds=seconds, stats=read_stats(image_dir, "dump"))


async def restore(
    b: CriuBinary,
    image_dir: Path,
    *,
    inherit: Mapping[str, int],
    log_path: Path,
    pidfile: Path,
    log_level: int = 2,
) -> CriuRun:
    """Restore detached; the fds in `inherit` must be open in this process (they are passed on)."""
    require_version(b)
    _prepare_restore(image_dir, pidfile)
    argv = restore_argv(
        b, image_dir, inherit=inherit, log_path=log_path, pidfile=pidfile, log_level=log_level
    )
    seconds = await _run(argv, "criu_restore", log_path, pass_fds=tuple(inherit.values()))
    return CriuRun(
        seconds=seconds, stats=read_stats(log_path.parent, "restore"), pid=_read_pid(pidfile, log_path)
    )


def _mkdir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)


def _prepare_restore(image_dir: Path, pidfile: Path) -> None:
    if not image_dir.is_dir():
        raise CriuError("criu_restore", f"image directory {image_dir} does not exist")
    pidfile.unlink(missing_ok=True)


def _read_pid(pidfile: Path, log_path: Path) -> int:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as e:
        raise CriuError(
            "criu_restore", f"CRIU wrote no pidfile {pidfile}: {e}", error_lines(log_path)
        ) from None
