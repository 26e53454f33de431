"""Operator verbs that belong to no single service: `deploy`.

Each verb builds Settings from the environment once, does its I/O, prints, returns an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from snapscale.shared import bus, spec
from snapscale.shared.settings import Settings
from snapscale.shared.subjects import Bucket


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("deploy", help="put a deployment spec (TOML) into KV 'deployments'")
    p.add_argument("spec", type=Path, help="spec.toml")
    p.set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    d = spec.load_toml(args.spec)
    asyncio.run(deploy(s, d))
    print(f"deployed {d.name} (spec hash {d.spec_hash()[:12]})")
    return 0


async def deploy(settings: Settings, d: spec.DeploymentSpec) -> None:
    b = await bus.open_bus(settings, "snapscale-deploy")
    try:
        await b.kv[Bucket.DEPLOYMENTS].put(d.name, d.to_json())
    finally:
        await b.close()
