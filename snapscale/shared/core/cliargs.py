"""What every `snapscale` subcommand's --help shares: the default of each argument, the
environment variables that apply (one table, read by `Settings.from_env` and the services'
configs), and argument types in the one unit style (`30s`, `2GiB`).

Pure argparse plumbing; services register their subcommands with it, so it lives in core.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.units import parse_duration, parse_size


@dataclass(frozen=True)
class Env:
    name: str
    default: str
    what: str
    group: str  # which subcommands it applies to: bus, store, host, restorer, gateway, telemetry, simulate


ENV: tuple[Env, ...] = (
    Env("SNAPSCALE_NATS_URL", "nats://127.0.0.1:4222", "NATS server", "bus"),
    Env("SNAPSCALE_NAMESPACE", "snapscale", "subject root; others prefix streams and buckets", "bus"),
    Env("SNAPSCALE_NATS_USER", "none: anonymous", "NATS user, with SNAPSCALE_NATS_PASSWORD", "bus"),
    Env("SNAPSCALE_NATS_TOKEN", "none", "NATS token, instead of a user", "bus"),
    Env("SNAPSCALE_NATS_NKEY", "none", "file holding a user nkey seed, instead of a user", "bus"),
    Env("SNAPSCALE_NATS_CREDS", "none", "NATS credentials file (JWT + seed), instead of a user", "bus"),
    Env("SNAPSCALE_NATS_CA", "none", "CA file to verify the NATS server's TLS certificate", "bus"),
    Env("SNAPSCALE_NATS_CERT", "none", "client certificate, with SNAPSCALE_NATS_KEY", "bus"),
    Env("SNAPSCALE_NATS_INBOX", "_INBOX", "reply subject prefix (one per role)", "bus"),
    Env(
        "SNAPSCALE_STORE",
        "file:///var/lib/snapscale/store",
        "chunk store: file:///path or s3://bucket/prefix",
        "store",
    ),
    Env("SNAPSCALE_SIGNING_KEY", "none", "HMAC key that signs and verifies manifests", "store"),
    Env("AWS_ENDPOINT_URL", "AWS's", "S3 endpoint (MinIO, moto); AWS_ENDPOINT_URL_S3 wins", "store"),
    Env("AWS_ACCESS_KEY_ID", "AWS's chain", "S3 credentials, with AWS_SECRET_ACCESS_KEY", "store"),
    Env("AWS_DEFAULT_REGION", "us-east-1", "S3 region (or AWS_REGION)", "store"),
    Env("AWS_CA_BUNDLE", "system", "CA bundle for a TLS S3 endpoint", "store"),
    Env("SNAPSCALE_STORE_CONCURRENCY", "32", "parallel S3 requests per process", "store"),
    Env("SNAPSCALE_STORE_RPS", "2000", "S3 request rate limit per process", "store"),
    Env(
        "SNAPSCALE_S3_DIRECT_GET",
        "1",
        "read chunk bodies straight into buffers (0: through aioboto3)",
        "store",
    ),
    Env("SNAPSCALE_HOST_ID", "the hostname", "this host's id in subjects and KV", "host"),
    Env("SNAPSCALE_STATE_DIR", "/var/lib/snapscale", "sandbox registry, staging, run dirs", "host"),
    Env("SNAPSCALE_CACHE_DIR", "/var/cache/snapscale", "host chunk cache", "host"),
    Env("SNAPSCALE_CACHE_BYTES", "64GiB in bytes", "host cache budget, in bytes", "host"),
    Env("SNAPSCALE_CRIU", ".criu/bin/criu, else criu on PATH", "CRIU binary", "host"),
    Env(
        "SNAPSCALE_SANDBOX",
        "oci",
        "host: development mode, also runs specs without sandbox.image as host processes",
        "host",
    ),
    Env(
        "SNAPSCALE_SANDBOX_MOUNTS",
        "none",
        "host dirs (colon-separated) whose contents specs' sandbox.mounts may show read-only",
        "host",
    ),
    Env("SNAPSCALE_CPU_SLOTS", "4", "replicas of CPU deployments at once", "restorer"),
    Env(
        "SNAPSCALE_SUSPEND_BUDGET_BYTES",
        "32GiB in bytes",
        "RAM suspended replicas may hold, in bytes",
        "restorer",
    ),
    Env("SNAPSCALE_HEARTBEAT_S", "3", "inventory interval, in seconds", "restorer"),
    Env("SNAPSCALE_HOT_IMAGES", "2", "assembled images kept for the next restore", "restorer"),
    Env(
        "SNAPSCALE_WEIGHTS_FILL",
        "workload",
        "who fills weights kept outside an image: workload, or host (fd handover)",
        "restorer",
    ),
    Env(
        "SNAPSCALE_FILL_STANDBY",
        "1",
        "with the host fill, a filler per GPU kept waiting (a CUDA context each); 0: off",
        "restorer",
    ),
    Env(
        "SNAPSCALE_IMAGE_DIR",
        "<state dir>/restorer",
        "where images are assembled (tmpfs: kept in RAM)",
        "restorer",
    ),
    Env(
        "SNAPSCALE_ADVERTISE_ADDR",
        "none: endpoints are host-local",
        "this host's address for other machines: a port forwarded to each replica",
        "restorer",
    ),
    Env(
        "SNAPSCALE_PAUSE_AT",
        "none",
        "tests only: <point>:<flag file> pauses a service at a phase (fault injection)",
        "restorer",
    ),
    Env("SNAPSCALE_FORWARD_PORTS", "30000-32767", "host ports forwarded to replicas (lo-hi)", "restorer"),
    Env("SNAPSCALE_JS_REPLICAS", "1", "servers each stream and KV bucket is kept on", "bus"),
    Env("SNAPSCALE_GATEWAY_LISTEN", "0.0.0.0:8080", "host:port the gateway serves requests on", "gateway"),
    Env("SNAPSCALE_GATEWAY_DOMAIN", "none: paths only", "also route Host: <deployment>.<domain>", "gateway"),
    Env("SNAPSCALE_GATEWAY_ID", "host id + random", "the gateway's source in traffic events", "gateway"),
    Env("SNAPSCALE_GATEWAY_REPORT_S", "0.5", "traffic report interval, in seconds (at most 1)", "gateway"),
    Env(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "none: nothing exported",
        "OTLP/HTTP endpoint for traces and metrics",
        "telemetry",
    ),
    Env("OTEL_SERVICE_NAME", "per service", "service name in traces", "telemetry"),
    Env("SNAPSCALE_METRICS_PORT", "none: no listener", "serve Prometheus /metrics on this port", "telemetry"),
    Env("SNAPSCALE_METRICS_HOST", "127.0.0.1", "the address /metrics listens on", "telemetry"),
    Env("SNAPSCALE_LOG_LEVEL", "INFO", "log level", "telemetry"),
    Env(
        "SNAPSCALE_SIM_INTERPRETED",
        "unset: compiled where built",
        "set: the interpreted simulator (python -m snapscale.simulate.native check)",
        "simulate",
    ),
)


def env_help(*groups: str) -> str:
    """The `environment:` section of a subcommand's --help: the variables of `groups`."""
    rows = [e for e in ENV if e.group in groups]
    width = max(len(e.name) for e in rows)
    lines = [f"  {e.name:<{width}}  {e.what} (default: {e.default})" for e in rows]
    return "environment:\n" + "\n".join(lines)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's table as written and adds each argument's default to its help."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        """`--timeout DURATION`, `--suspend-budget SIZE`: the unit style, not the variable name."""
        if action.type is duration:
            return "DURATION"
        return "SIZE" if action.type is size else action.dest.upper()

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = "%(default)" in text or "default" in text
        none = action.default in (None, False, argparse.SUPPRESS) or isinstance(action.default, list)
        if not shown and not none and action.option_strings:
            text += " (default: %(default)s)"
        return text


def subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, *env: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows each argument's default and the environment variables
    of the groups `env` (bus, store, host, restorer, gateway, telemetry, simulate)."""
    return sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=env_help(*env) if env else None,
        formatter_class=Formatter,
    )


def duration(text: str) -> float:
    """An argparse type: `30s`, `2m`, `500ms`, `1h` (a bare number is seconds)."""
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size(text: str) -> int:
    """An argparse type: `512MiB`, `2GiB` or a number of bytes."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_alias(p: argparse.ArgumentParser, old: str, dest: str, type_: Callable[[str], Any]) -> None:
    """Accept a flag's former spelling (`--timeout-s 120`) without showing it in --help, so
    scripts written for it keep working; the value reads in the new style (a bare number is
    seconds or bytes, as it was)."""
    p.add_argument(old, dest=dest, type=type_, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
