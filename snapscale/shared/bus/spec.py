"""The deployment spec: how to start a workload, tell it is ready, freeze it and scale it.

Loaded from TOML by `snapscale deploy spec.toml`, stored as JSON in KV `deployments`.
Pure: parsing and hashing only.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from snapscale.shared.bus.subjects import check_token
from snapscale.shared.core import wire
from snapscale.shared.core.errors import ConfigError, MessageError


@dataclass(frozen=True)
class ReadySpec:
    """How to tell the workload is ready. Exactly one of http/tcp/file is used, in that order."""

    http_path: str | None = "/healthz"  # GET http://<endpoint><path> answering 2xx
    tcp: bool = False  # a TCP connect to the endpoint is enough
    file: str | None = None  # this path exists (inside the sandbox's filesystem view)
    timeout_s: float = 300.0
    interval_s: float = 0.05


@dataclass(frozen=True)
class HooksSpec:
    """HTTP POST paths on the sandbox's endpoint, each with a deadline."""

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

    target_concurrency: float = 1.0  # requests in flight one replica should hold
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
        """Range checks of the scale-down delay and the activation scale, as "field: reason"
        (empty when fine): Knative's own checks of the same knobs, in one place so that the
        spec's validation can take them in. A max_replicas of 0 (a disabled or removed
        deployment, drained so) bounds no activation scale, as Knative's max-scale 0 bounds none.
        """
        out: list[str] = []
        if not 0.0 <= self.scale_down_delay_s <= 3600.0:
            out.append(f"scale_down_delay_s: must be within [0, 3600] s, got {self.scale_down_delay_s}")
        if self.activation_scale < 1:
            out.append(f"activation_scale: must be at least 1, got {self.activation_scale}")
        elif self.activation_scale > 1:
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
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    port: int = 8000  # the workload listens here inside its own network namespace
    gpus: int = 0  # GPUs per replica; 0 = CPU sandbox
    gpu_model: str | None = None  # None: any model
    image: list[str] = field(default_factory=list)  # files/dirs whose digest is the runtime identity
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


def spec_from_mapping(data: Any) -> DeploymentSpec:
    try:
        return wire.from_plain(DeploymentSpec, data, "spec")
    except MessageError as e:
        raise ConfigError(f"deployment spec: {e.field}: {e.reason}") from None


def load_spec(path: Path) -> DeploymentSpec:
    """Read a spec file; the deployment is the `[deployment]` table or the whole file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec_from_mapping(data.get("deployment", data))
