"""This host's compatibility keys: the one for each deployment spec (which checkpoint a scale-up
may restore) and the host's own fields (what the heartbeat carries).

Reading a key is costly (it fingerprints files; the host part asks NVML and the driver), so the
keys are kept: a spec's a short while, since a file may change under it; the host part for good.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time

from snapscale.restorer.specs import deployed_spec
from snapscale.shared.bus import Bucket, Bus, DeploymentSpec, kv_keys
from snapscale.shared.engine import CompatKey, CriuBinary, cuda_driver_version, host_key, read_gpus

log = logging.getLogger(__name__)
COMPAT_TTL_S = 30.0


class CompatKeys:
    def __init__(self, criu: CriuBinary) -> None:
        self.criu = criu
        self._by_spec: dict[str, tuple[float, CompatKey]] = {}  # spec hash -> (monotonic read at, key)
        self._host: CompatKey | None = None

    async def for_spec(self, spec: DeploymentSpec) -> tuple[str, dict[str, str]]:
        """This host's compatibility key for `spec` (hash, fields); it fingerprints files (off the
        loop), so it is kept a short while per spec."""
        now = time.monotonic()
        cached = self._by_spec.get(spec.spec_hash())
        if cached is None or now - cached[0] >= COMPAT_TTL_S:
            key = await asyncio.to_thread(host_key, spec, criu=self.criu, gpu_count=spec.gpus)
            cached = (now, key)
            self._by_spec[spec.spec_hash()] = cached
        return cached[1].hash(), cached[1].as_dict()

    async def host_part(self) -> CompatKey:
        """The host's own fields, read once (NVML and the driver, off the loop)."""
        if self._host is None:
            self._host = await asyncio.to_thread(host_part, self.criu)
        return self._host


def host_part(criu: CriuBinary) -> CompatKey:
    """The key's host fields alone (no deployment's runtime or spec): what the heartbeat carries."""
    gpus = read_gpus()
    return CompatKey(
        gpu_model=gpus.model,
        gpu_count=str(gpus.count),
        driver_version=gpus.driver,
        cuda_driver_version=cuda_driver_version() if gpus.count else "none",
        criu_version=criu.version,
        kernel_release=platform.release(),
        runtime_fingerprint="",
        spec_hash="",
    )


async def deployment_keys(b: Bus, keys: CompatKeys, limit: int = 256) -> dict[str, str]:
    """deployment -> this host's compat hash for it, for every deployed spec (the heartbeat's)."""
    kv = b.kv[Bucket.DEPLOYMENTS]
    names = sorted(await kv_keys(kv))[:limit]
    out: dict[str, str] = {}
    for name in names:
        try:
            spec = await deployed_spec(b, name)
            out[name] = (await keys.for_spec(spec))[0]
        except Exception as e:  # one bad spec must not cost the host its heartbeat
            log.debug("no compat key for deployment %s: %s", name, e)
    return out
