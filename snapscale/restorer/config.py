"""The restorer's own knobs (beyond the shared `Settings`): CPU slots, suspend budget, intervals.

Frozen; built once by the CLI from flags and the environment. Units are in the names.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from snapscale.shared.bus import HEARTBEAT_INTERVAL_S
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.settings import Settings

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
WEIGHTS_FILLS = ("workload", "host")


@dataclass(frozen=True)
class RestorerConfig:
    host: str
    cpu_slots: int = 4  # replicas of CPU deployments this host runs at once
    suspend_budget_bytes: int = 32 << 30  # RAM suspended replicas may hold before the oldest stops
    heartbeat_s: float = 3.0
    ack_wait_s: float = 30.0  # the command consumer's ack wait; in-flight work extends it
    max_inflight: int = 16  # commands handled at once (restores beyond free slots fail fast)
    adopt_ready_timeout_s: float = 15.0  # a re-adopted sandbox must answer its probe by then
    drain_s: float = 20.0  # on stop, time in-flight commands get to finish before they are cancelled
    auto_freeze: bool = True  # ask the freezer to freeze a cold-booted replica whose spec wants it
    work_dir: Path | None = None  # run dirs and images; default <state_dir>/restorer
    hot_images: int = 2  # assembled images kept for the next restore of their checkpoint; 0: none
    image_dir: Path | None = None  # where images are assembled and kept hot (a tmpfs); default <work>
    # SNAPSCALE_ADVERTISE_ADDR: this host's address other machines reach it at; set, each replica
    # gets a host port forwarded to it (forwarding.py) and its endpoint is <advertise_addr>:<port>
    advertise_addr: str | None = None
    forward_ports: tuple[int, int] = (30000, 32767)  # SNAPSCALE_FORWARD_PORTS, lo-hi inclusive
    # SNAPSCALE_WEIGHTS_FILL: who fills a GPU workload's weights after a restore: "workload" (from
    # the host cache's chunk files, in after_restore) or "host" (a process beside the CRIU restore,
    # handed over as an fd: workload/handover.py)
    weights_fill: str = "workload"
    # SNAPSCALE_FILL_STANDBY: with the host fill, a filler per GPU kept started and waiting (one CUDA
    # context each, ~0.5 GiB of GPU memory) so a restore's fill starts at once: restorer/standby.py
    fill_standby: bool = True

    def __post_init__(self) -> None:
        if self.cpu_slots < 0:
            raise ConfigError(f"cpu_slots must be >= 0, got {self.cpu_slots}")
        if self.heartbeat_s <= 0 or self.ack_wait_s <= 0:
            raise ConfigError("heartbeat_s and ack_wait_s must be positive")
        lo, hi = self.forward_ports
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(f"SNAPSCALE_FORWARD_PORTS={lo}-{hi}: want lo-hi with 1 <= lo <= hi <= 65535")
        if self.advertise_addr is not None:
            check_advertise_addr(self.advertise_addr)
        if self.weights_fill not in WEIGHTS_FILLS:
            want = " or ".join(WEIGHTS_FILLS)
            raise ConfigError(f"SNAPSCALE_WEIGHTS_FILL={self.weights_fill!r}: want {want}")
        if (why := HEARTBEAT_INTERVAL_S.problem(self.heartbeat_s)) is not None:
            raise ConfigError(f"heartbeat_s {why} (a scaler refuses heartbeats outside that)")

    def dirs(self, settings: Settings) -> Path:
        return self.work_dir or settings.state_dir / "restorer"

    def images_root(self, settings: Settings) -> Path:
        """Assembled images; the hot ones beside them (`hot_root`), on the same filesystem, since an
        image becomes hot by a rename."""
        return (self.image_dir or self.dirs(settings)) / "images"

    def hot_root(self, settings: Settings) -> Path:
        return (self.image_dir or self.dirs(settings)) / "hot"

    @classmethod
    def from_env(cls, host: str, env: Mapping[str, str] | None = None, **overrides: object) -> RestorerConfig:
        e = os.environ if env is None else env
        kw: dict[str, object] = {"host": host}
        for name, key, conv in (
            ("cpu_slots", "SNAPSCALE_CPU_SLOTS", int),
            ("suspend_budget_bytes", "SNAPSCALE_SUSPEND_BUDGET_BYTES", int),
            ("heartbeat_s", "SNAPSCALE_HEARTBEAT_S", float),
            ("hot_images", "SNAPSCALE_HOT_IMAGES", int),
            ("image_dir", "SNAPSCALE_IMAGE_DIR", Path),
            ("advertise_addr", "SNAPSCALE_ADVERTISE_ADDR", str),
            ("forward_ports", "SNAPSCALE_FORWARD_PORTS", parse_port_range),
            ("weights_fill", "SNAPSCALE_WEIGHTS_FILL", str),
            ("fill_standby", "SNAPSCALE_FILL_STANDBY", parse_flag),
        ):
            raw = e.get(key)
            if raw:
                try:
                    kw[name] = conv(raw)
                except ValueError as e:
                    raise ConfigError(f"{key}={raw!r} is not a valid value: {e}") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)  # type: ignore[arg-type]


def parse_flag(raw: str) -> bool:
    """`1` as True, `0` as False. Pure."""
    if raw.strip() not in ("0", "1"):
        raise ValueError("want 0 or 1")
    return raw.strip() == "1"


def parse_port_range(raw: str) -> tuple[int, int]:
    """`30000-32767` as (30000, 32767); one port `30000` as (30000, 30000). Pure."""
    lo, sep, hi = raw.strip().partition("-")
    try:
        pair = (int(lo), int(hi) if sep else int(lo))
    except ValueError:
        raise ValueError("want a port range such as 30000-32767") from None
    return pair


def check_advertise_addr(addr: str) -> str:
    """A host name or an IPv4 address, without a port: the forwarded ports are IPv4 (DNAT `ip`)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        if not _HOSTNAME.fullmatch(addr):
            raise ConfigError(
                f"SNAPSCALE_ADVERTISE_ADDR={addr!r}: want this host's IPv4 address or DNS name, no port"
            ) from None
        return addr
    if ip.version != 4:
        raise ConfigError(f"SNAPSCALE_ADVERTISE_ADDR={addr!r}: forwarded ports are IPv4 only")
    return addr
