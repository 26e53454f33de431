"""Operator verbs that belong to no single service: `deploy`, `checkpoints ls|show|verify|gc`.

Each verb builds Settings from the environment once, does its I/O, prints, returns an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson

from snapscale.gateway.pool import limits_of
from snapscale.shared import bus
from snapscale.shared.bus import Bucket, DeploymentSpec, load_spec
from snapscale.shared.core import wire
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.settings import Settings
from snapscale.shared.store import (
    DEFAULT_GC_GRACE_S,
    MANIFESTS,
    ChunkStore,
    Manifest,
    ManifestError,
    NotFoundError,
    check_manifest_key,
    collect_garbage,
    fetch_manifest,
    manifest_key,
    open_store,
    verify_checkpoint,
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("deploy", help="put a deployment spec (TOML) into KV 'deployments'")
    p.add_argument("spec", type=Path, help="spec.toml")
    p.set_defaults(func=_deploy)

    c = sub.add_parser("checkpoints", help="list, show, verify and garbage-collect checkpoints in the store")
    verbs = c.add_subparsers(dest="verb", metavar="VERB", required=True)
    v = verbs.add_parser("ls", help="every manifest in the store, verified")
    v.add_argument("--deployment", help="only this deployment")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=lambda a: _run(_ls(a)))
    v = verbs.add_parser("show", help="one checkpoint's manifest: files, sizes, timings")
    v.add_argument("ref", help="<deployment>/<checkpoint-id> or a manifest key")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=lambda a: _run(_show(a)))
    v = verbs.add_parser("verify", help="check every chunk is in the store and hashes to its name")
    v.add_argument("ref", help="<deployment>/<checkpoint-id> or a manifest key")
    v.add_argument("--shallow", action="store_true", help="only check presence, do not download")
    v.set_defaults(func=lambda a: _run(_verify(a)))
    v = verbs.add_parser("gc", help="delete chunks no manifest references and nobody touched for a while")
    v.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GC_GRACE_S,
        help="keep younger chunks (a freeze may be uploading)",
    )
    v.add_argument("--dry-run", action="store_true")
    v.set_defaults(func=lambda a: _run(_gc(a)))


def _deploy(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    d = load_spec(args.spec)
    limits_of(d)  # the gateway's keys: refused here, not found out when a gateway reads them
    asyncio.run(deploy(s, d))
    print(f"deployed {d.name} (spec hash {d.spec_hash()[:12]})")
    return 0


async def deploy(settings: Settings, d: DeploymentSpec) -> None:
    b = await bus.open_bus(settings, "snapscale-deploy")
    try:
        await b.kv[Bucket.DEPLOYMENTS].put(d.name, d.to_json())
    finally:
        await b.close()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def manifest_ref(ref: str) -> str:
    """A manifest key from `<deployment>/<checkpoint-id>` or the key itself."""
    try:
        if ref.startswith(MANIFESTS):
            return check_manifest_key(ref)
        deployment, _, cid = ref.partition("/")
        return manifest_key(deployment, cid.removesuffix(".json"))
    except ValueError as e:
        raise ConfigError(f"{ref!r} is not <deployment>/<checkpoint-id> or a manifest key: {e}") from None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


async def _ls(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    key = s.require_signing_key()
    rows: list[dict[str, Any]] = []
    async with open_store(s.store) as st:
        for info in await st.list_manifests(args.deployment):
            try:
                m = await fetch_manifest(st, info.key, key)
            except NotFoundError:
                continue
            except ManifestError as e:
                rows.append({"key": info.key, "refused": e.reason})
                continue
            rows.append({
                "key": info.key, "deployment": m.deployment, "checkpoint_id": m.checkpoint_id,
                "created_at": m.created_at, "compat_hash": m.compat_hash, "files": len(m.files),
                "total_bytes": m.total_bytes, "unique_bytes": m.unique_bytes, "new_bytes": m.new_bytes,
                "zero_bytes": m.zero_bytes,
            })  # fmt: skip
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{'DEPLOYMENT':<20} {'CHECKPOINT':<28} {'CREATED (UTC)':<20} {'TOTAL MiB':>10} {'UNIQUE':>8} "
          f"{'NEW':>8} {'ZERO':>8}  COMPAT")  # fmt: skip
    for r in rows:
        if "refused" in r:
            print(f"{r['key']}: REFUSED: {r['refused']}")
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))
        print(f"{r['deployment']:<20} {r['checkpoint_id']:<28} {created:<20} {_mib(r['total_bytes']):>10} "
              f"{_mib(r['unique_bytes']):>8} {_mib(r['new_bytes']):>8} {_mib(r['zero_bytes']):>8}  "
              f"{r['compat_hash'][:12]}")  # fmt: skip
    return 0


async def _load(st: ChunkStore, s: Settings, ref: str) -> Manifest:
    return await fetch_manifest(st, manifest_ref(ref), s.require_signing_key())


async def _show(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    async with open_store(s.store) as st:
        m = await _load(st, s, args.ref)
    if args.json:
        print(orjson.dumps(wire.to_plain(m), option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"checkpoint {m.checkpoint_id} of {m.deployment} (format {m.format_version}, signature ok)")
    print(f"  created   {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(m.created_at))}")
    print(f"  compat    {m.compat_hash}")
    for k, v in sorted(m.compat.items()):
        print(f"    {k} = {v}")
    print(f"  sizes     total {_mib(m.total_bytes)} MiB, unique {_mib(m.unique_bytes)}, "
          f"new {_mib(m.new_bytes)}, zero {_mib(m.zero_bytes)}; "
          f"{len(m.digests())} chunks of {_mib(m.chunk_bytes)} MiB")  # fmt: skip
    if m.timings_s:
        print("  timings   " + ", ".join(f"{k} {v:.3f}s" for k, v in sorted(m.timings_s.items())))
    print(f"  files ({len(m.files)}):")
    for f in m.files:
        print(f"    {f.mode:04o} {f.size:>14} {f.path}")
    return 0


async def _verify(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    async with open_store(s.store) as st:
        m = await _load(st, s, args.ref)
        rep = await verify_checkpoint(st, m, deep=not args.shallow)
    for d in rep.missing:
        print(f"missing  {d}")
    for d in rep.corrupt:
        print(f"corrupt  {d}")
    how = (
        "present" if args.shallow else f"present and hash to their names ({_mib(rep.bytes_checked)} MiB read)"
    )
    if rep.ok:
        print(f"ok: {rep.chunks} chunks {how}")
        return 0
    print(f"FAILED: {len(rep.missing)} missing, {len(rep.corrupt)} corrupt of {rep.chunks} chunks")
    return 1


async def _gc(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    async with open_store(s.store) as st:
        plan = await collect_garbage(st, s.require_signing_key(), grace_s=args.grace_s, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(plan.delete)} chunks ({_mib(plan.bytes_freed)} MiB); kept {plan.kept_referenced} "
          f"referenced, {plan.kept_young} younger than {args.grace_s:.0f}s")  # fmt: skip
    return 0
