"""Per-replica network namespaces: `ip netns` + a veth pair + a private /30 out of 10.213.0.0/16.

The host side of the pair is `ssv<n>` at .1, the sandbox side `eth0` at .2: the replica's endpoint.
Allocation is serialised (asyncio lock in-process, flock across processes); nothing here kills processes.
Each namespace made for a sandbox names its owner (the sandbox's run dir) in `/run/snapscale-netns/`:
namespaces are host-wide, so a restorer starting after a crash removes the ones its own run dirs
own and nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.engine.errors import EngineError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
POOL = ipaddress.IPv4Network("10.213.0.0/16")
PREFIX = "snapscale-"
_SLOTS = POOL.num_addresses // 4
_LOCK_PATH = Path("/run/snapscale-netns.lock")
OWNERS_DIR = Path("/run/snapscale-netns")  # <netns name> -> the run dir it was made for
_alloc_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}


def _alloc_lock() -> asyncio.Lock:
    """One lock per event loop: an asyncio.Lock used from a second loop raises."""
    loop = asyncio.get_running_loop()
    lock = _alloc_locks.get(loop)
    if lock is None:
        for old in [lp for lp in _alloc_locks if lp.is_closed()]:
            del _alloc_locks[old]
        lock = _alloc_locks[loop] = asyncio.Lock()
    return lock


@dataclass(frozen=True)
class NetNs:
    name: str  # under /run/netns
    index: int  # the /30 slot in POOL

    @property
    def host_if(self) -> str:
        return f"ssv{self.index}"

    @property
    def host_ip(self) -> str:
        return str(POOL.network_address + 4 * self.index + 1)

    @property
    def sandbox_ip(self) -> str:
        return str(POOL.network_address + 4 * self.index + 2)

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name


def parse_name(name: str) -> NetNs:
    m = re.fullmatch(rf"{PREFIX}(\d+)", name)
    if not m or int(m.group(1)) >= _SLOTS:
        raise EngineError("netns", f"{name!r} is not a snapscale network namespace name")
    return NetNs(name=name, index=int(m.group(1)))


def netns_inode(name: str) -> int:
    """The namespace's inode: CRIU names an external netns by it (`net[<inode>]`)."""
    return os.stat(NETNS_DIR / name).st_ino


def existing_netns() -> list[NetNs]:
    if not NETNS_DIR.exists():
        return []
    out = []
    for p in NETNS_DIR.iterdir():
        try:
            out.append(parse_name(p.name))
        except EngineError:
            continue
    return out


def hint(replica: str) -> int:
    """The slot a replica gets when it is free. Pure."""
    return zlib.crc32(replica.encode()) % _SLOTS


def free_slot(used: set[int], hint: int) -> int:
    """The first free slot at or after `hint` (wrapping). Pure."""
    for k in range(_SLOTS):
        i = (hint + k) % _SLOTS
        if i not in used:
            return i
    raise EngineError("netns", f"all {_SLOTS} sandbox subnets in {POOL} are in use")


def _ip(*commands: tuple[str, ...], netns: str | None = None) -> None:
    """`ip [-n NETNS] -batch -`: the commands in order in one process, stopping at the first that
    fails. Their words are names and addresses made here (no spaces, no quotes). Blocking."""
    args = ("-n", netns, "-batch", "-") if netns else ("-batch", "-")
    script = "".join(" ".join(c) + "\n" for c in commands).encode()
    r = subprocess.run(["ip", *args], input=script, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, check=False)  # fmt: skip
    if r.returncode != 0:
        said, what = r.stderr.decode(errors="replace").strip(), "; ".join(map(" ".join, commands))
        raise EngineError("netns", f"ip {' '.join(args)} ({what}) failed: {said}")


def _links() -> set[str]:
    """The interfaces of this process's network namespace. /proc/net/dev, not /sys/class/net: sysfs
    shows the namespace of whoever mounted it, which is not ours under `nsenter --net`."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines if ":" in line}


def _host_links() -> set[int]:
    out = set()
    for name in _links():
        m = re.fullmatch(r"ssv(\d+)", name)
        if m:
            out.add(int(m.group(1)))
    return out


def netns_owner(name: str) -> Path | None:
    """The run dir the namespace `name` was made for, or None when it names none."""
    try:
        return Path((OWNERS_DIR / name).read_text())
    except (OSError, ValueError):
        return None


def _set_owner(name: str, owner: Path | None) -> None:
    """Written before the namespace exists (a crash in between leaves a record of nothing, never a
    namespace without its owner); cleared when the name is taken by a sandbox that names none."""
    path = OWNERS_DIR / name
    if owner is None:
        path.unlink(missing_ok=True)
        return
    OWNERS_DIR.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(owner.resolve()))
    tmp.rename(path)


async def create(replica: str, owner: Path | None = None) -> NetNs:
    """Make a fresh netns for `replica` with its veth pair, addresses, routes and loopback up;
    `owner` (the sandbox's run dir) is recorded for `netns_owner`. All of it on one thread: on a
    busy event loop (a prefetch beside a restore) every await would wait for the loop
    (`python -m bench.netns`)."""
    async with _alloc_lock():
        work = asyncio.ensure_future(asyncio.to_thread(_create, replica, owner))
        try:
            ns = await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the thread runs on: undo what it made
                await delete_netns((await work).name)
            raise
    log.debug("netns %s for %s: endpoint ip %s", ns.name, replica, ns.sandbox_ip)
    return ns


def _create(replica: str, owner: Path | None) -> NetNs:
    fd = os.open(_LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        used = {n.index for n in existing_netns()} | _host_links()
        # A stable hint spreads replicas over the pool so a slot just freed is rarely reused at once.
        index = free_slot(used, hint(replica))
        ns = NetNs(name=f"{PREFIX}{index}", index=index)
        _set_owner(ns.name, owner)
        try:
            _ip(
                ("netns", "add", ns.name),
                ("link", "add", ns.host_if, "type", "veth", "peer", "name", "eth0", "netns", ns.name),
                ("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if),
                ("link", "set", ns.host_if, "up"),
            )
            _ip(
                ("addr", "add", f"{ns.sandbox_ip}/30", "dev", "eth0"),
                ("link", "set", "eth0", "up"),
                ("link", "set", "lo", "up"),
                ("route", "add", "default", "via", ns.host_ip),
                netns=ns.name,
            )
        except EngineError:
            _delete(ns.name)
            raise
    finally:
        os.close(fd)  # closing drops the flock
    return ns


async def delete_netns(name: str) -> None:
    """Remove the netns and its veth pair. Idempotent; processes still inside keep it alive."""
    await asyncio.to_thread(_delete, name)


def _delete(name: str) -> None:
    ns = parse_name(name)
    # first: once the namespace is gone its name may be taken, and the record with it
    _set_owner(ns.name, None)
    if _link_exists(ns.host_if):
        try:
            _ip(("link", "del", ns.host_if))
        except EngineError as e:
            log.warning("%s", e)
    if ns.path.exists():
        _ip(("netns", "del", ns.name))


def _link_exists(name: str) -> bool:
    return name in _links()


def pids_in_netns(name: str) -> list[int]:
    """Host PIDs of the processes whose network namespace is `name`."""
    try:
        want = netns_inode(name)
    except FileNotFoundError:
        return []
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.stat(p / "ns" / "net").st_ino == want:
                out.append(int(p.name))
        except OSError:
            continue
    return out
