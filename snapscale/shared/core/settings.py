"""Process settings: frozen dataclasses built once from the environment in `__main__`/the CLI.

Nothing else in snapscale reads `os.environ`; pass `Settings` down instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from snapscale.shared.core.errors import ConfigError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_CACHE_DIR = "/var/cache/snapscale"
DEFAULT_STATE_DIR = "/var/lib/snapscale"
MAX_JS_REPLICAS = 5  # JetStream's own limit
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")


@dataclass(frozen=True)
class StoreSettings:
    """Where chunks and manifests live: `file:///path` (embedded default) or `s3://bucket/prefix`."""

    url: str
    endpoint_url: str | None = None  # AWS_ENDPOINT_URL, for MinIO or moto
    region: str = "us-east-1"
    max_concurrency: int = 32
    max_requests_per_s: float = 2000.0
    direct_get: bool = True  # chunk bodies read straight into buffers (shared/httpget.py)

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme

    @property
    def local_path(self) -> Path:
        u = urlparse(self.url)
        if u.scheme != "file":
            raise ConfigError(f"store {self.url!r} is not a file:// store")
        return Path(u.path)

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.url).path.strip("/")

    @classmethod
    def parse(cls, url: str, **kw: object) -> StoreSettings:
        u = urlparse(url)
        if u.scheme == "file":
            if not u.path.startswith("/"):
                raise ConfigError(
                    f"SNAPSCALE_STORE={url!r}: a file store needs an absolute path, file:///path"
                )
        elif u.scheme == "s3":
            if not u.netloc:
                raise ConfigError(f"SNAPSCALE_STORE={url!r}: an S3 store needs a bucket, s3://bucket/prefix")
        else:
            raise ConfigError(f"SNAPSCALE_STORE={url!r}: use file:///path or s3://bucket/prefix")
        return cls(url=url, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NatsAuth:
    """How this process proves who it is to NATS, and how it checks the server (TLS).

    The server's authorization decides what each identity may publish and subscribe to
    (compose/nats.conf gives every role its own subjects); without any of these the connection is
    anonymous, which only a server without authorization accepts."""

    user: str | None = None  # SNAPSCALE_NATS_USER, with SNAPSCALE_NATS_PASSWORD
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)  # SNAPSCALE_NATS_TOKEN
    creds_file: Path | None = None  # SNAPSCALE_NATS_CREDS: a user JWT and its nkey seed (`nsc`)
    nkey_seed_file: Path | None = None  # SNAPSCALE_NATS_NKEY: a user nkey seed (`nk -gen user`)
    ca_file: Path | None = None  # SNAPSCALE_NATS_CA: verify the server against this CA (TLS)
    cert_file: Path | None = None  # SNAPSCALE_NATS_CERT and SNAPSCALE_NATS_KEY: a client certificate
    key_file: Path | None = None
    # SNAPSCALE_NATS_INBOX: where replies come back. A role's own prefix lets the server allow it
    # only its own replies (a host reading the inbox of all would see other hosts' commands).
    inbox_prefix: str = "_INBOX"

    def __post_init__(self) -> None:
        ways = [n for n, v in (("user", self.user), ("token", self.token), ("creds", self.creds_file),
                               ("nkey", self.nkey_seed_file)) if v]  # fmt: skip
        if len(ways) > 1:
            raise ConfigError(f"NATS credentials: set one of user/password, token, creds or nkey, not {ways}")
        if self.password and not self.user:
            raise ConfigError("SNAPSCALE_NATS_PASSWORD without SNAPSCALE_NATS_USER")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("SNAPSCALE_NATS_CERT and SNAPSCALE_NATS_KEY go together")

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None


@dataclass(frozen=True)
class Settings:
    """Everything a snapscale process is configured with. Units are in the names."""

    # One server or a cluster's, comma-separated: a client reconnects to another when one goes.
    nats_url: str = DEFAULT_NATS_URL
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    namespace: str = "snapscale"  # subject root and KV/stream prefix; tests use their own
    store: StoreSettings = field(
        default_factory=lambda: StoreSettings(url=f"file://{DEFAULT_STATE_DIR}/store")
    )
    signing_key: bytes = b""
    cache_dir: Path = Path(DEFAULT_CACHE_DIR)
    cache_bytes: int = 64 << 30
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    host_id: str = field(default_factory=socket.gethostname)
    criu_path: str | None = None  # SNAPSCALE_CRIU; else found by snapscale.shared.engine.criu
    otlp_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT; None exports nothing
    metrics_port: int | None = None  # SNAPSCALE_METRICS_PORT: serve Prometheus /metrics; None: no listener
    metrics_host: str = "127.0.0.1"  # SNAPSCALE_METRICS_HOST: the address it listens on
    service_name: str = "snapscale"
    log_level: str = "INFO"
    js_replicas: int = 1  # copies of every stream and KV bucket JetStream keeps (3 on a cluster)

    def __post_init__(self) -> None:
        nats_servers(self.nats_url)
        if not 1 <= self.js_replicas <= MAX_JS_REPLICAS:
            raise ConfigError(
                f"SNAPSCALE_JS_REPLICAS={self.js_replicas}: JetStream keeps 1 to {MAX_JS_REPLICAS} replicas"
            )

    @property
    def nats_servers(self) -> list[str]:
        """The server URLs `nats_url` lists, in order."""
        return nats_servers(self.nats_url)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return None if self.metrics_port is None else (self.metrics_host, self.metrics_port)

    def require_signing_key(self) -> bytes:
        if not self.signing_key:
            raise ConfigError("SNAPSCALE_SIGNING_KEY is not set: manifests cannot be signed or verified")
        return self.signing_key

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read the environment once. `overrides` (e.g. from CLI flags) win over it."""
        e = os.environ if env is None else env
        state_dir = Path(e.get("SNAPSCALE_STATE_DIR", DEFAULT_STATE_DIR))
        store = StoreSettings.parse(
            e.get("SNAPSCALE_STORE", f"file://{state_dir}/store"),
            endpoint_url=e.get("AWS_ENDPOINT_URL_S3") or e.get("AWS_ENDPOINT_URL") or None,
            region=e.get("AWS_DEFAULT_REGION") or e.get("AWS_REGION") or "us-east-1",
            max_concurrency=_int(e, "SNAPSCALE_STORE_CONCURRENCY", 32),
            max_requests_per_s=float(_int(e, "SNAPSCALE_STORE_RPS", 2000)),
            direct_get=_bool(e, "SNAPSCALE_S3_DIRECT_GET", True),
        )
        kw: dict[str, object] = dict(
            nats_url=e.get("SNAPSCALE_NATS_URL", DEFAULT_NATS_URL),
            nats_auth=NatsAuth(
                user=e.get("SNAPSCALE_NATS_USER") or None,
                password=e.get("SNAPSCALE_NATS_PASSWORD") or None,
                token=e.get("SNAPSCALE_NATS_TOKEN") or None,
                creds_file=_path(e, "SNAPSCALE_NATS_CREDS"),
                nkey_seed_file=_path(e, "SNAPSCALE_NATS_NKEY"),
                ca_file=_path(e, "SNAPSCALE_NATS_CA"),
                cert_file=_path(e, "SNAPSCALE_NATS_CERT"),
                key_file=_path(e, "SNAPSCALE_NATS_KEY"),
                inbox_prefix=e.get("SNAPSCALE_NATS_INBOX") or "_INBOX",
            ),
            namespace=e.get("SNAPSCALE_NAMESPACE", "snapscale"),
            store=store,
            signing_key=e.get("SNAPSCALE_SIGNING_KEY", "").encode(),
            cache_dir=Path(e.get("SNAPSCALE_CACHE_DIR", DEFAULT_CACHE_DIR)),
            cache_bytes=_int(e, "SNAPSCALE_CACHE_BYTES", 64 << 30),
            state_dir=state_dir,
            host_id=e.get("SNAPSCALE_HOST_ID") or socket.gethostname(),
            criu_path=e.get("SNAPSCALE_CRIU") or None,
            otlp_endpoint=e.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            metrics_port=_port(e, "SNAPSCALE_METRICS_PORT"),
            metrics_host=e.get("SNAPSCALE_METRICS_HOST") or "127.0.0.1",
            service_name=e.get("OTEL_SERVICE_NAME", "snapscale"),
            log_level=e.get("SNAPSCALE_LOG_LEVEL", "INFO"),
            js_replicas=_int(e, "SNAPSCALE_JS_REPLICAS", 1),
        )
        kw.update(overrides)
        return cls(**kw)  # type: ignore[arg-type]


class NatsUrlError(ConfigError):
    """SNAPSCALE_NATS_URL names no NATS server: an operator's verb reads it as "unavailable"."""


def nats_servers(raw: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` as a list; raises `ConfigError` naming the entry that is wrong."""
    out = [u.strip() for u in raw.split(",")]
    if not raw.strip() or "" in out:
        raise NatsUrlError(f"SNAPSCALE_NATS_URL={raw!r}: an empty server entry; list URLs, comma-separated")
    for u in out:
        p = urlparse(u)
        if p.scheme not in _NATS_SCHEMES or not p.hostname:
            raise NatsUrlError(
                f"SNAPSCALE_NATS_URL={raw!r}: {u!r} is not a NATS URL: use nats://host:4222 "
                "(or tls://, ws://, wss://)"
            )
        try:
            p.port  # noqa: B018 - parsing it raises on a port that is not a number
        except ValueError:
            raise NatsUrlError(f"SNAPSCALE_NATS_URL={raw!r}: {u!r} has a bad port") from None
    return out


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: say 1 or 0")


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw) if raw else None


def _port(env: Mapping[str, str], name: str) -> int | None:
    if not env.get(name):
        return None
    port = _int(env, name, 0)
    if not 0 < port < 65536:
        raise ConfigError(f"{name}={port}: a TCP port is 1-65535")
    return port


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
