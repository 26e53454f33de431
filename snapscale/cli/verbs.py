"""The operator's verbs on a running cluster: `deploy`, `undeploy`, `deployments`, `status`,
`wait`, `freeze`, `prefetch`, `traffic`. Each is a thin wrapper around `snapscale.client`: parse,
call, print the answer (text, or JSON with `--json`) on stdout, progress on stderr, exit code.

Errors are raised, not printed: `snapscale.cli.main` turns them into one line and an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from snapscale.cli.output import json_flag, print_json
from snapscale.cli.progress import Display
from snapscale.client import Client, Deployment, Settings
from snapscale.freezer.operator import format_event
from snapscale.restorer import status as status_mod
from snapscale.shared.bus import ReplicaState, load_spec
from snapscale.shared.core import telemetry, wire
from snapscale.shared.core.cliargs import add_alias, duration, subcommand
from snapscale.shared.core.fieldcheck import FieldsError
from snapscale.shared.core.units import format_duration, format_time

EXIT_FAILED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subcommand(sub, "deploy", "check a deployment spec (TOML) and put it into KV 'deployments'", "bus")
    p.add_argument("spec", type=Path, help="the spec file, e.g. examples/sample_cpu.toml")
    p.add_argument("--dry-run", action="store_true", help="only check the spec; needs no server")
    json_flag(p)
    p.set_defaults(func=_deploy)

    p = subcommand(sub, "undeploy", "remove a deployment; the scaler stops all its replicas", "bus")
    p.add_argument("deployment", help="the deployment's name")
    p.add_argument("--no-wait", action="store_true", help="return once removed, before its replicas are")
    p.add_argument("--timeout", type=duration, default="2m", help="how long to wait for the replicas to go")
    json_flag(p)
    p.set_defaults(func=_undeploy)

    p = subcommand(sub, "deployments", "every deployment with its replica counts", "bus")
    json_flag(p)
    p.set_defaults(func=_deployments)

    p = subcommand(sub, "status", "hosts, replicas, checkpoints and host caches; reads only", "bus")
    json_flag(p)
    p.set_defaults(func=_status)

    p = subcommand(sub, "wait", "wait until a deployment has ready replicas", "bus")
    p.add_argument("deployment", help="the deployment's name")
    p.add_argument("--replicas", type=int, default=1, help="how many must be ready")
    p.add_argument("--timeout", type=duration, default="5m", help="give up after this long (exit 1)")
    json_flag(p)
    p.set_defaults(func=_wait)

    p = subcommand(sub, "freeze", "freeze a replica now; prints the checkpoint's sizes and timings", "bus")
    p.add_argument("deployment", help="the deployment's name")
    p.add_argument("--replica", help="which replica (default: the oldest ready one in KV 'replicas')")
    p.add_argument("--host", help="its host (default: the replica's host from KV 'replicas')")
    p.add_argument(
        "--stop", action="store_true", help="stop the replica after the dump (default: it keeps serving)"
    )
    p.add_argument(
        "--timeout", type=duration, default="15m", help="give up waiting for the freezer after this"
    )
    add_alias(p, "--timeout-s", "timeout", duration)
    json_flag(p)
    p.set_defaults(func=_freeze)

    p = subcommand(sub, "prefetch", "have a host fetch a deployment's checkpoint into its cache", "bus")
    p.add_argument("deployment", help="the deployment's name")
    p.add_argument("--host", required=True, help="the host whose cache gets it (as in `snapscale status`)")
    p.add_argument("--checkpoint", help="which checkpoint (default: the catalog's for the host's key)")
    p.add_argument("--no-wait", action="store_true", help="return once asked, before the host has it")
    p.add_argument("--timeout", type=duration, default="10m", help="give up waiting after this long (exit 1)")
    json_flag(p)
    p.set_defaults(func=_prefetch)

    p = subcommand(
        sub, "traffic", "publish traffic events for a deployment, as a gateway would", "bus", "telemetry"
    )
    p.add_argument("deployment", help="the deployment's name")
    p.add_argument("--rps", type=float, default=1.0, help="requests arriving per second")
    p.add_argument("--concurrency", type=float, default=1.0, help="requests in flight + queued to report")
    p.add_argument("--for", dest="duration", type=duration, default="30s", help="how long, e.g. 30s, 2m")
    p.add_argument("--events-per-s", type=float, default=None, help="report rate (default: min(rps, 20))")
    json_flag(p)
    p.set_defaults(func=_traffic)


def _with_client(body: Callable[[Client], Awaitable[int]]) -> int:
    settings = Settings.from_env()

    async def main() -> int:
        async with Client(settings, name="snapscale-cli") as c:
            return await body(c)

    return asyncio.run(main())


# --- deployments -----------------------------------------------------------------------------
def _deploy(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except FieldsError as e:
        if args.json:
            print_json({"ok": False, "problems": [{"field": p.path, "reason": p.reason} for p in e.problems]})
        raise
    if args.dry_run:
        if args.json:
            print_json({"ok": True, "name": spec.name, "spec_hash": spec.spec_hash(), "spec": spec})
        else:
            print(
                f"{args.spec}: ok, deployment {spec.name} (spec hash {spec.spec_hash()[:12]}); not deployed"
            )
        return 0

    async def body(c: Client) -> int:
        d = await c.deploy(spec)
        if args.json:
            print_json({"ok": True, **wire.to_plain(d)})
        else:
            print(f"deployed {d.name} ({d.change}, spec hash {d.spec_hash[:12]})")
        return 0

    return _with_client(body)


def _undeploy(args: argparse.Namespace) -> int:
    async def body(c: Client) -> int:
        show = Display()
        try:
            u = await c.undeploy(
                args.deployment, wait=not args.no_wait, timeout_s=args.timeout, on_progress=show
            )
        finally:
            show.close()
        if args.json:
            print_json(u)
        elif args.no_wait:
            print(f"removed {u.name}; the scaler stops its {len(u.left)} replicas")
        elif u.left:
            held = ", ".join(f"{r.replica}@{r.host}={r.state.value}" for r in u.left)
            print(
                f"removed {u.name}, but after {format_duration(args.timeout)} its replicas are still held: "
                f"{held} (is a scaler running?)",
                file=sys.stderr,
            )
        else:
            released = f" ({', '.join(u.released)})" if u.released else ""
            print(f"undeployed {u.name}: {len(u.released)} replicas stopped{released}")
        return EXIT_FAILED if u.left and not args.no_wait else 0

    return _with_client(body)


def deployments_table(deps: list[Deployment]) -> str:
    """Pure: one row per deployment (ready/all replicas, scaling bounds, spec hash, and whether
    it can be frozen: "cannot be frozen: <reason> since <time>" for each key a freeze was refused on)."""
    rows = []
    for d in deps:
        ready = sum(1 for r in d.replicas if r.state is ReplicaState.READY)
        suspended = sum(1 for r in d.replicas if r.state is ReplicaState.SUSPENDED)
        freeze = "; ".join(
            f"{r.line()} since {format_time(r.since)} (key {r.compat_hash[:12]})" for r in d.refusals
        )
        if d.spec is None:
            rows.append(
                [d.name, "-", f"{ready}/{len(d.replicas)}", str(suspended), "-", "-", d.problem, freeze]
            )
            continue
        sc = d.spec.scaling
        rows.append([
            d.name, str(d.spec.gpus), f"{ready}/{len(d.replicas) - suspended}", str(suspended),
            f"{sc.min_replicas}-{sc.max_replicas}", sc.release_mode, d.spec.spec_hash()[:12], freeze or "-",
        ])  # fmt: skip
    headers = ["DEPLOYMENT", "GPUS", "READY", "SUSPENDED", "REPLICAS", "RELEASE", "SPEC", "FREEZE"]
    return _columns(headers, rows)


def _columns(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(no deployments)"
    widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]
    )


def _deployments(args: argparse.Namespace) -> int:
    async def body(c: Client) -> int:
        deps = await c.deployments()
        if args.json:
            print_json(deps)
        else:
            print(deployments_table(deps))
        return 0

    return _with_client(body)


def _status(args: argparse.Namespace) -> int:
    async def body(c: Client) -> int:
        st = await c.status()
        if args.json:
            print_json(st)
        else:
            print(status_mod.render(st))
        return 0

    return _with_client(body)


# --- replicas ----------------------------------------------------------------------------------
def _wait(args: argparse.Namespace) -> int:
    async def body(c: Client) -> int:
        show = Display()
        try:
            ready = await c.wait_ready(
                args.deployment, replicas=args.replicas, timeout_s=args.timeout, on_progress=show
            )
        finally:
            show.close()
        if args.json:
            print_json(ready)
            return 0
        for r in ready:
            tier = r.tier.value if r.tier else "-"
            print(f"ready: {r.replica} on {r.host} at {r.endpoint or '-'} (tier {tier})")
        return 0

    return _with_client(body)


def _freeze(args: argparse.Namespace) -> int:
    async def body(c: Client) -> int:
        show = Display()
        try:
            ev = await c.freeze(
                args.deployment, replica=args.replica, host=args.host, keep_running=not args.stop,
                timeout_s=args.timeout, on_progress=show,
            )  # fmt: skip
        finally:
            show.close()
        if args.json:
            print_json(ev)
        else:
            print(format_event(ev))
        return 0 if ev.ok else EXIT_FAILED

    return _with_client(body)


def _prefetch(args: argparse.Namespace) -> int:
    async def body(c: Client) -> int:
        show = Display()
        try:
            got = await c.prefetch(
                args.deployment, args.host, checkpoint_id=args.checkpoint, wait=not args.no_wait,
                timeout_s=args.timeout, on_progress=show,
            )  # fmt: skip
        finally:
            show.close()
        if args.json:
            print_json(got)
        elif not got.sent:
            print(f"{got.checkpoint_id} of {got.deployment} is in {got.host}'s cache already")
        elif not got.done:
            print(f"asked {got.host} to prefetch {got.checkpoint_id} of {got.deployment}")
        else:
            print(f"prefetched {got.checkpoint_id} of {got.deployment} into {got.host}'s cache")
        return 0

    return _with_client(body)


def _traffic(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    telemetry.setup(f"{settings.service_name}-traffic", settings.otlp_endpoint)

    async def body(c: Client) -> int:
        show = Display()
        t0 = time.monotonic()
        try:
            n = await c.traffic(
                args.deployment, rps=args.rps, concurrency=args.concurrency, duration_s=args.duration,
                events_per_s=args.events_per_s, on_progress=show,
            )  # fmt: skip
        finally:
            show.close()
        if args.json:
            print_json({"deployment": args.deployment, "events": n, "duration_s": args.duration,
                         "took_s": round(time.monotonic() - t0, 3)})  # fmt: skip
        else:
            print(f"published {n} traffic events for {args.deployment} over {format_duration(args.duration)}")
        return 0

    try:
        return _with_client(body)
    finally:
        telemetry.shutdown()
