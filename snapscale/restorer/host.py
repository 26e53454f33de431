"""The restorer's in-process state of its host: live replicas, reservations, the open edges
(bus, store, cache), and how a failure reads to an operator. Owns no loop and starts nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.js.errors import NoKeysError

from snapscale.restorer.checkpoints import Checkpoints
from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.hot import HotImages
from snapscale.restorer.ledger import Ledger
from snapscale.restorer.slots import Slots
from snapscale.shared import bus as busmod
from snapscale.shared.bus import Bucket, Bus, DeploymentSpec, ReplicaState, ReplicaSummary, Tier
from snapscale.shared.core.errors import ConfigError, SnapscaleError
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import (
    CompatKey,
    CriuBinary,
    Sandbox,
    SandboxRegistry,
    cuda_driver_version,
    host_key,
    read_gpus,
)

log = logging.getLogger(__name__)
COMPAT_TTL_S = 30.0


@dataclass
class Live:
    """A sandbox this restorer runs (ready) or keeps (suspended)."""

    spec: DeploymentSpec
    sandbox: Sandbox
    state: ReplicaState
    tier: Tier | None
    since: float
    checkpoint_id: str | None = None
    rss_bytes: int = 0  # measured when suspended

    def summary(self) -> ReplicaSummary:
        return ReplicaSummary(
            deployment=self.spec.name,
            replica=self.sandbox.replica,
            state=self.state,
            gpu_uuids=list(self.sandbox.gpu_uuids),
            since=self.since,
            rss_bytes=self.rss_bytes,
        )


@dataclass
class Host:
    settings: Settings
    config: RestorerConfig
    bus: Bus
    criu: CriuBinary
    slots: Slots
    ledger: Ledger
    registry: SandboxRegistry
    checkpoints: Checkpoints
    live: dict[str, Live] = field(default_factory=dict)
    # replica -> its scale-up in progress, so a release can cancel it and a duplicate can wait
    starting: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    cancelled_by_release: set[str] = field(default_factory=set)  # else a cancel means shutdown
    compat_cache: dict[str, tuple[float, CompatKey]] = field(default_factory=dict)
    host_key: CompatKey | None = None  # the host's own fields, read once
    catalog_seen_at: float = float("-inf")  # monotonic time the inventory last read the catalog
    hot: HotImages | None = None  # assembled images kept for the next restore of the same checkpoint

    @property
    def name(self) -> str:
        return self.config.host

    @property
    def work_dir(self) -> Path:
        return self.config.dirs(self.settings)

    def run_dir(self, replica: str, command_id: str) -> Path:
        tag = hashlib.sha256(command_id.encode()).hexdigest()[:10]
        return self.work_dir / "run" / f"{replica}.{tag}"

    def attempt_dir(self, run_dir: str) -> Path | None:
        """The per-attempt folder under `<work>/run/` holding `run_dir`, or None if elsewhere."""
        root = self.work_dir / "run"
        try:
            rel = Path(run_dir).relative_to(root)
        except ValueError:
            return None
        return root / rel.parts[0] if rel.parts else None

    def image_dir(self, replica: str, command_id: str) -> Path:
        return self.config.images_root(self.settings) / self.run_dir(replica, command_id).name

    def suspended_of(self, deployment: str) -> list[str]:
        """Suspended replicas of `deployment`, the most recently suspended first (warmest pages)."""
        s = [
            lv
            for lv in self.live.values()
            if lv.spec.name == deployment and lv.state is ReplicaState.SUSPENDED
        ]
        return [lv.sandbox.replica for lv in sorted(s, key=lambda lv: -lv.since)]

    def now(self) -> float:
        return time.time()


class DeploymentUnknownError(ConfigError):
    """The command names a deployment KV `deployments` does not hold."""


async def load_spec(b: Bus, deployment: str) -> DeploymentSpec:
    got = await busmod.kv_get(b.kv[Bucket.DEPLOYMENTS], deployment)
    if got is None:
        raise DeploymentUnknownError(f"deployment {deployment!r} is not deployed (no spec in KV deployments)")
    return DeploymentSpec.from_json(got[0])


async def host_compat(h: Host, spec: DeploymentSpec) -> tuple[str, dict[str, str]]:
    """This host's compatibility key for `spec` (hash, fields); it fingerprints files (off the
    loop), so it is kept a short while per spec."""
    now = time.monotonic()
    cached = h.compat_cache.get(spec.spec_hash())
    if cached is None or now - cached[0] >= COMPAT_TTL_S:
        key = await asyncio.to_thread(host_key, spec, criu=h.criu, gpu_count=spec.gpus)
        cached = (now, key)
        h.compat_cache[spec.spec_hash()] = cached
    return cached[1].hash(), cached[1].as_dict()


async def deployment_keys(h: Host, limit: int = 256) -> dict[str, str]:
    """deployment -> this host's compat hash for it, for every deployed spec (the heartbeat's)."""
    kv = h.bus.kv[Bucket.DEPLOYMENTS]
    try:
        names = sorted(await kv.keys())[:limit]
    except NoKeysError:
        return {}
    out: dict[str, str] = {}
    for name in names:
        try:
            spec = await load_spec(h.bus, name)
            out[name] = (await host_compat(h, spec))[0]
        except Exception as e:  # one bad spec must not cost the host its heartbeat
            log.debug("no compat key for deployment %s: %s", name, e)
    return out


def host_part(h: Host) -> CompatKey:
    """The key's host fields alone (no deployment's runtime or spec): what the heartbeat carries."""
    gpus = read_gpus()
    return CompatKey(
        gpu_model=gpus.model,
        gpu_count=str(gpus.count),
        driver_version=gpus.driver,
        cuda_driver_version=cuda_driver_version() if gpus.count else "none",
        criu_version=h.criu.version,
        kernel_release=platform.release(),
        runtime_fingerprint="",
        spec_hash="",
    )


# printed on every CRIU run here, or by every failed one: neither says what broke
_CRIU_NOISE = ("RLIMIT_NOFILE", "Restoring FAILED", "Dumping FAILED")


def criu_cause(log_tail: str) -> str:
    """The line of CRIU's error output that says what broke (the last one that is not noise)."""
    lines = [ln.strip() for ln in log_tail.strip().splitlines() if ln.strip()]
    telling = [ln for ln in lines if not any(n in ln for n in _CRIU_NOISE)]
    return (telling or lines or [""])[-1]


def describe(e: BaseException) -> str:
    """One line an operator can act on, for a failure anywhere in a scale-up."""
    from snapscale.shared.engine import CriuError, EngineError

    if isinstance(e, CriuError) and e.log_tail.strip():
        return f"{e.step}: {e.reason}: {criu_cause(e.log_tail)[:240]}"
    if isinstance(e, EngineError):
        return f"{e.step}: {e.reason}"
    name = type(e).__name__
    if isinstance(e, TimeoutError):
        return f"timed out ({e})" if str(e) else "timed out"
    if isinstance(e, SnapscaleError):
        return f"{name}: {e}"
    return f"{name}: {e}" if str(e) else name
