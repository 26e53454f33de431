"""The operator's verbs on the chunk store: `checkpoints ls|show|verify|gc`. They need no NATS.

Each verb builds Settings from the environment once, does its I/O, prints (text, or JSON with
`--json`), returns an exit code; errors are raised for `snapscale.cli.main` to report.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from snapscale.cli.output import json_flag, print_json
from snapscale.cli.progress import Display
from snapscale.client import Progress
from snapscale.shared.core import wire
from snapscale.shared.core.cliargs import add_alias, duration, subcommand
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.settings import Settings
from snapscale.shared.core.units import format_duration, format_size, format_time
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = subcommand(
        sub, "checkpoints", "list, show, verify and garbage-collect checkpoints in the store", "store"
    )
    verbs = c.add_subparsers(dest="verb", metavar="VERB", required=True)
    v = subcommand(verbs, "ls", "every manifest in the store, verified", "store")
    v.add_argument("--deployment", help="only this deployment")
    json_flag(v)
    v.set_defaults(func=lambda a: _run(_ls(a)))
    v = subcommand(verbs, "show", "one checkpoint's manifest: files, sizes, timings", "store")
    v.add_argument("ref", help="<deployment>/<checkpoint-id> or a manifest key")
    json_flag(v)
    v.set_defaults(func=lambda a: _run(_show(a)))
    v = subcommand(verbs, "verify", "check every chunk is in the store and hashes to its name", "store")
    v.add_argument("ref", help="<deployment>/<checkpoint-id> or a manifest key")
    v.add_argument("--shallow", action="store_true", help="only check presence, do not download")
    json_flag(v)
    v.set_defaults(func=lambda a: _run(_verify(a)))
    v = subcommand(
        verbs, "gc", "delete chunks no manifest references and nobody touched for a while", "store"
    )
    v.add_argument(
        "--grace",
        type=duration,
        default=format_duration(DEFAULT_GC_GRACE_S),
        help="keep younger chunks (a freeze may be uploading them)",
    )
    add_alias(v, "--grace-s", "grace", duration)
    v.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    json_flag(v)
    v.set_defaults(func=lambda a: _run(_gc(a)))


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
        print_json(rows)
        return 0
    print(f"{'DEPLOYMENT':<20} {'CHECKPOINT':<28} {'CREATED (UTC)':<20} {'TOTAL':>9} {'UNIQUE':>9} "
          f"{'NEW':>9} {'ZERO':>9}  COMPAT")  # fmt: skip
    for r in rows:
        if "refused" in r:
            print(f"{r['key']}: REFUSED: {r['refused']}")
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))
        print(f"{r['deployment']:<20} {r['checkpoint_id']:<28} {created:<20} {_iec(r['total_bytes']):>9} "
              f"{_iec(r['unique_bytes']):>9} {_iec(r['new_bytes']):>9} {_iec(r['zero_bytes']):>9}  "
              f"{r['compat_hash'][:12]}")  # fmt: skip
    return 0


async def _load(st: ChunkStore, s: Settings, ref: str) -> Manifest:
    return await fetch_manifest(st, manifest_ref(ref), s.require_signing_key())


async def _show(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    async with open_store(s.store) as st:
        m = await _load(st, s, args.ref)
    if args.json:
        print_json(m)
        return 0
    print(f"checkpoint {m.checkpoint_id} of {m.deployment} (format {m.format_version}, signature ok)")
    print(f"  created   {format_time(m.created_at)}")
    print(f"  compat    {m.compat_hash}")
    for k, v in sorted(m.compat.items()):
        print(f"    {k} = {v}")
    print(f"  sizes     total {_iec(m.total_bytes)}, unique {_iec(m.unique_bytes)}, "
          f"new {_iec(m.new_bytes)}, zero {_iec(m.zero_bytes)}; "
          f"{len(m.digests())} chunks of {_iec(m.chunk_bytes)}")  # fmt: skip
    if m.timings_s:
        print("  timings   " + ", ".join(f"{k} {v:.3f}s" for k, v in sorted(m.timings_s.items())))
    print(f"  files ({len(m.files)}):")
    for f in m.files:
        print(f"    {f.mode:04o} {f.size:>14} {f.path}")
    return 0


async def _verify(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    show = Display()
    async with open_store(s.store) as st:
        m = await _load(st, s, args.ref)
        total, done = len(m.digests()), [0, 0]  # chunks, bytes

        def step(n: int) -> None:
            done[0] += 1
            done[1] += n
            show(Progress(f"verify {m.deployment}/{m.checkpoint_id}", done[0], total, "chunks"))

        try:
            rep = await verify_checkpoint(st, m, deep=not args.shallow, on_chunk=step)
        finally:
            show.close()
    if args.json:
        print_json({"ok": rep.ok, "deep": not args.shallow, **wire.to_plain(rep)})
        return 0 if rep.ok else 1
    for d in rep.missing:
        print(f"missing  {d}")
    for d in rep.corrupt:
        print(f"corrupt  {d}")
    how = "present" if args.shallow else f"present and hash to their names ({_iec(rep.bytes_checked)} read)"
    if rep.ok:
        print(f"ok: {rep.chunks} chunks {how}")
        return 0
    print(f"FAILED: {len(rep.missing)} missing, {len(rep.corrupt)} corrupt of {rep.chunks} chunks")
    return 1


async def _gc(args: argparse.Namespace) -> int:
    s = Settings.from_env()
    async with open_store(s.store) as st:
        plan = await collect_garbage(st, s.require_signing_key(), grace_s=args.grace, dry_run=args.dry_run)
    if args.json:
        print_json({"dry_run": args.dry_run, "grace_s": args.grace, **wire.to_plain(plan)})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(plan.delete)} chunks ({_iec(plan.bytes_freed)}); kept {plan.kept_referenced} "
          f"referenced, {plan.kept_young} younger than {format_duration(args.grace)}")  # fmt: skip
    return 0


def _iec(n: int) -> str:
    return format_size(n)
