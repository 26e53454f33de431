"""The deployment spec: how to start a workload, tell it is ready, freeze it and scale it.

Loaded from TOML by `snapscale deploy spec.toml`, stored as JSON in KV `deployments`.
Pure: parsing and hashing only.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from snapscale.shared.bus.sandbox_spec import SandboxSpec
from snapscale.shared.bus.subjects import check_token
from snapscale.shared.core import wire
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.fieldcheck import Check, FieldsError, Limits, Order, Problem, Range, check

DAY_S = 86400.0


def _url_path(value: str | None) -> None:
    if value is not None and not value.startswith("/"):
        raise ValueError(f"must be a URL path starting with '/', got {value!r}")


def _not_empty(value: list[str]) -> None:
    if not value:
        raise ValueError('is empty: say what to run, e.g. ["python", "-m", "server"]')


@dataclass(frozen=True)
class ReadySpec:
    """How to tell the workload is ready. Exactly one of http/tcp/file is used, in that order."""

    LIMITS: ClassVar[Limits] = {
        "http_path": Check(_url_path),
        "timeout_s": Range(0, DAY_S, "s", above=True),
        "interval_s": Range(0.001, 60, "s"),
    }

    http_path: str | None = "/healthz"  # GET http://<endpoint><path> answering 2xx
    tcp: bool = False  # a TCP connect to the endpoint is enough
    file: str | None = None  # this path exists (inside the sandbox's filesystem view)
    timeout_s: float = 300.0
    interval_s: float = 0.05


@dataclass(frozen=True)
class HooksSpec:
    """HTTP POST paths on the sandbox's endpoint, each with a deadline."""

    LIMITS: ClassVar[Limits] = {
        "before_freeze": Check(_url_path),
        "after_restore": Check(_url_path),
        "timeout_s": Range(0, 3600, "s", above=True),
    }

    before_freeze: str | None = None
    after_restore: str | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class FreezeSpec:
    after_ready: bool = False  # auto-freeze the first cold-booted replica (keep serving)
    keep_running: bool = True


@dataclass(frozen=True)
class ScalingSpec:
    """Knative-KPA-like autoscaling knobs; docs/scaling.md maps them to Knative, KEDA and Modal."""

    # Every number declares its range here (a test checks none is left out); Knative's bounds
    # where it has the same knob (windows 1 s-1 h, rates above 1).
    LIMITS: ClassVar[Limits] = {
        "target_concurrency": Range(0, 1e6, above=True),
        "utilization": Range(0, 1, above=True),
        "stable_window_s": Range(1, 3600, "s"),
        "panic_window_s": Range(1, 3600, "s"),
        "panic_threshold": Range(1, 1000),
        "max_scale_up_rate": Range(1, 1e6, above=True),
        "max_scale_down_rate": Range(1, 1e6, above=True),
        "min_replicas": Range(0, 10_000),
        "max_replicas": Range(0, 10_000),
        "scale_to_zero_after_s": Range(0, DAY_S, "s"),
        "ready_timeout_s": Range(0, DAY_S, "s", above=True),
        "scale_down_delay_s": Range(0, 3600, "s"),
        "activation_scale": Range(1, 10_000),
        "concurrency_limit": Range(0, 1e6),
        "queue_size": Range(0, 1e6),
        "queue_timeout_s": Range(0, DAY_S, "s", above=True),
    }
    ORDER: ClassVar[Order] = (("min_replicas", "max_replicas"), ("panic_window_s", "stable_window_s"))

    target_concurrency: float = 1.0  # requests in flight one replica should hold
    # the request path (snapscale gateway), per gateway: at most this many requests in flight on
    # one replica (0: no limit); while no replica can take one, up to queue_size requests wait
    # queue_timeout_s for one, then get a 503 with Retry-After
    concurrency_limit: int = 0
    queue_size: int = 1000
    queue_timeout_s: float = 120.0
    utilization: float = 0.7  # fraction of target used to size (headroom)
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0  # panic when the panic-window desire reaches 2x current
    max_scale_up_rate: float = 1000.0  # replicas may grow at most this factor per tick
    max_scale_down_rate: float = 2.0  # replicas may shrink at most by this factor per tick
    min_replicas: int = 0
    max_replicas: int = 10
    scale_to_zero_after_s: float = 30.0  # grace before the last replica goes, counted from:
    # "last-traffic", the last traffic event; "inactive", when the decided count reached zero
    # (Knative's scale-to-zero-grace-period, where the activator joins the request path then)
    scale_to_zero_grace_from: Literal["last-traffic", "inactive"] = "last-traffic"
    # keep the highest count decided this long before going down (Knative scale-down-delay); 0: off
    scale_down_delay_s: float = 0.0
    # a desire above zero is raised to this many, so a scale from zero starts at least these
    # (Knative activation-scale); 1: off
    activation_scale: int = 1
    ready_timeout_s: float = 300.0  # a replica not ready by then is placed elsewhere
    release_mode: Literal["auto", "stop", "suspend"] = "auto"

    def problems(self) -> list[str]:
        """The activation scale against min_replicas and max_replicas, as "field: reason"
        (empty when fine): Knative's own checks of the same knobs, in one place so that the
        spec's validation can take them in. A max_replicas of 0 (a disabled or removed
        deployment, drained so) bounds no activation scale, as Knative's max-scale 0 bounds none.
        """
        out: list[str] = []
        if self.activation_scale > 1:  # its range is in LIMITS; these rules relate it to others
            if self.activation_scale < self.min_replicas:
                out.append(
                    f"activation_scale: {self.activation_scale} is below min_replicas {self.min_replicas}"
                )
            if 0 < self.max_replicas < self.activation_scale:
                out.append(
                    f"activation_scale: {self.activation_scale} is above max_replicas {self.max_replicas}"
                )
        return out


@dataclass(frozen=True)
class DeploymentSpec:
    LIMITS: ClassVar[Limits] = {
        "name": Check(lambda v: check_token("deployment", v)),
        "command": Check(_not_empty),
        "port": Range(1, 65535),
        "gpus": Range(0, 64),
    }

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    port: int = 8000  # the workload listens here inside its own network namespace
    gpus: int = 0  # GPUs per replica; 0 = CPU sandbox
    gpu_model: str | None = None  # None: any model
    image: list[str] = field(default_factory=list)  # files/dirs whose digest is the runtime identity
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)  # the OCI image and its containment
    ready: ReadySpec = field(default_factory=ReadySpec)
    hooks: HooksSpec = field(default_factory=HooksSpec)
    freeze: FreezeSpec = field(default_factory=FreezeSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)

    def __post_init__(self) -> None:
        try:
            check_token("deployment", self.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.command:
            raise ConfigError(f"deployment {self.name}: command is empty")
        bad = self.scaling.problems()
        if bad:
            raise ConfigError(f"deployment {self.name}: " + "; ".join(f"scaling.{p}" for p in bad))

    def spec_hash(self) -> str:
        """What a checkpoint depends on: everything but the scaling knobs."""
        plain = wire.to_plain(self)
        plain.pop("scaling", None)
        plain.pop("freeze", None)
        return hashlib.sha256(wire.canonical(plain)).hexdigest()

    def to_json(self) -> bytes:
        return wire.canonical(self)

    @classmethod
    def from_json(cls, data: bytes) -> DeploymentSpec:
        import orjson

        try:
            return spec_from_mapping(orjson.loads(data))
        except orjson.JSONDecodeError as e:
            raise ConfigError(f"deployment spec is not JSON: {e}") from None


def spec_from_mapping(data: Any, what: str = "deployment spec", root: str = "") -> DeploymentSpec:
    """The spec `data` describes, or a `FieldsError` listing every problem at once, each with its
    field path under `root` (unknown keys, types, ranges, `min_replicas <= max_replicas`, ...)."""
    problems = check(DeploymentSpec, data, root)
    if problems:
        raise FieldsError(what, problems)
    return wire.from_plain(DeploymentSpec, data, "spec")


def load_spec(path: Path) -> DeploymentSpec:
    """Read a spec file; the deployment is the `[deployment]` table or the whole file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec_from_toml(data, str(path))


def spec_from_toml(data: dict[str, Any], what: str) -> DeploymentSpec:
    """A spec file's tables: with a `[deployment]` table, nothing may sit beside it (a `[scaling]`
    meant as `[deployment.scaling]` would otherwise be dropped without a word)."""
    if not isinstance(data.get("deployment"), dict):
        return spec_from_mapping(data, what)
    stray = [
        Problem(k, f"outside [deployment]: did you mean deployment.{k}?") for k in data if k != "deployment"
    ]
    try:
        spec = spec_from_mapping(data["deployment"], what, "deployment")
    except FieldsError as e:
        raise FieldsError(what, [*stray, *e.problems]) from None
    if stray:
        raise FieldsError(what, stray)
    return spec
