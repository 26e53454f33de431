"""The gateway's own knobs (beyond the shared `Settings`): where it listens, the domain of
Host-header routing, its id in traffic reports, how often it reports.

Frozen; built once by the CLI from flags and the environment. Units are in the names.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from snapscale.shared.core.errors import ConfigError

DEFAULT_LISTEN = "0.0.0.0:8080"


@dataclass(frozen=True)
class GatewayConfig:
    gateway_id: str  # `source` of its traffic events: the scaler sums the gateways by it
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    domain: str = ""  # `<deployment>.<domain>` in the Host header routes; "": path prefixes only
    report_s: float = 0.5  # traffic events per deployment with requests, at least once a second
    connect_timeout_s: float = 5.0  # to a replica; a refused or timed-out connect is retried
    eject_s: float = 5.0  # a replica that refused a connection gets no new requests this long
    via: str = "snapscale-gateway"  # the pseudonym in the Via header

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port <= 65535:
            raise ConfigError(f"gateway listen port: must be within 0..65535, got {self.listen_port}")
        if not 0 < self.report_s <= 1.0:
            raise ConfigError(f"gateway report_s: must be within (0, 1] s, got {self.report_s}")
        if self.connect_timeout_s <= 0 or self.eject_s <= 0:
            raise ConfigError(
                f"gateway connect_timeout_s and eject_s: must be positive, got {self.connect_timeout_s}, "
                f"{self.eject_s}"
            )
        if self.domain.startswith(".") or self.domain.endswith("."):
            raise ConfigError(f"gateway domain {self.domain!r}: give it without leading or trailing dots")

    @classmethod
    def from_env(
        cls, host_id: str, env: Mapping[str, str] | None = None, **overrides: object
    ) -> GatewayConfig:
        """SNAPSCALE_GATEWAY_LISTEN (host:port), _DOMAIN, _ID, _REPORT_S; `overrides` (flags) win."""
        e = os.environ if env is None else env
        gateway_id = e.get("SNAPSCALE_GATEWAY_ID") or f"{host_id}-{uuid.uuid4().hex[:6]}"
        kw: dict[str, object] = {"gateway_id": gateway_id}
        listen = overrides.pop("listen", None) or e.get("SNAPSCALE_GATEWAY_LISTEN") or DEFAULT_LISTEN
        kw["listen_host"], kw["listen_port"] = parse_listen(str(listen))
        if e.get("SNAPSCALE_GATEWAY_DOMAIN"):
            kw["domain"] = e["SNAPSCALE_GATEWAY_DOMAIN"].lower()
        raw = e.get("SNAPSCALE_GATEWAY_REPORT_S")
        if raw:
            try:
                kw["report_s"] = float(raw)
            except ValueError:
                raise ConfigError(f"SNAPSCALE_GATEWAY_REPORT_S={raw!r} is not a number") from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(kw.get("domain"), str):
            kw["domain"] = str(kw["domain"]).lower()
        return cls(**kw)  # type: ignore[arg-type]


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port`, `:port` (all addresses) or `[v6]:port`."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"gateway listen address {text!r}: use host:port, e.g. 0.0.0.0:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
