"""The snapscale Python API: what the `snapscale` operator verbs do, for scripts and gateways.

One `Client` per cluster (its NATS server and namespace, from `Settings`), async, used as a context
manager; the CLI's verbs are thin wrappers around it. Example::

    import asyncio
    from pathlib import Path
    from snapscale.client import Client, load_spec

    async def main() -> None:
        async with Client() as c:  # Settings.from_env(): SNAPSCALE_NATS_URL, SNAPSCALE_NAMESPACE
            await c.deploy(load_spec(Path("examples/sample_cpu.toml")))
            await c.traffic("sample-cpu", rps=2, concurrency=1, duration_s=5)
            [ready] = await c.wait_ready("sample-cpu", timeout_s=120)
            print(ready.endpoint, ready.tier)
            ck = await c.freeze("sample-cpu")
            print(ck.checkpoint_id, ck.sizes)
            await c.undeploy("sample-cpu")

    asyncio.run(main())

Errors: `ConfigError` (bad input, named; nothing was sent), `NotFoundError` (no such deployment,
replica, host or checkpoint), `UnavailableError` (NATS unreachable or without JetStream, within a
few seconds), `TimeoutError` (no answer in time: is the service running?).
"""

from snapscale.client.api import (
    Client,
    Deployed,
    Deployment,
    OnProgress,
    Prefetched,
    Progress,
    Undeployed,
)
from snapscale.restorer.status import Status
from snapscale.shared.bus import CheckpointEvent, DeploymentSpec, ReplicaEvent, ReplicaState, load_spec
from snapscale.shared.core.errors import ConfigError, NotFoundError, SnapscaleError, UnavailableError
from snapscale.shared.core.settings import Settings

__all__ = [
    "CheckpointEvent",
    "Client",
    "ConfigError",
    "Deployed",
    "Deployment",
    "DeploymentSpec",
    "NotFoundError",
    "OnProgress",
    "Prefetched",
    "Progress",
    "ReplicaEvent",
    "ReplicaState",
    "Settings",
    "SnapscaleError",
    "Status",
    "UnavailableError",
    "Undeployed",
    "load_spec",
]
