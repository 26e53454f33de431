"""A deployment's spec as the restorer reads it: from KV `deployments`, on every use, since a
redeploy replaces it and a scale-up must start what is deployed now."""

from __future__ import annotations

from snapscale.restorer.errors import DeploymentUnknownError
from snapscale.shared import bus as busmod
from snapscale.shared.bus import Bucket, Bus, DeploymentSpec


async def deployed_spec(b: Bus, deployment: str) -> DeploymentSpec:
    got = await busmod.kv_get(b.kv[Bucket.DEPLOYMENTS], deployment)
    if got is None:
        raise DeploymentUnknownError(f"deployment {deployment!r} is not deployed (no spec in KV deployments)")
    return DeploymentSpec.from_json(got[0])
