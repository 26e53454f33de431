"""`snapscale demo`: snapscale on one machine with nothing running, start to finish.

It starts a nats-server, the three services and a gateway as separate processes, deploys the sample
sandbox and sends real HTTP requests through the gateway: cold boot and auto-freeze, scale to zero,
restore. It never leaves anything running: every process it started and every sandbox under its
work dir is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import orjson

from snapscale.demo.live import Console, first_answer, follow
from snapscale.demo.procs import ProcessSet, find_exe, free_port, log_tail, port_open, reap_sandboxes
from snapscale.demo.report import DemoState, ScaleUp, cleanup_lines, summary, to_plain
from snapscale.shared import bus
from snapscale.shared.bus import Bucket, DeploymentSpec, Tier, load_spec
from snapscale.shared.core import runtime, telemetry
from snapscale.shared.core.cliargs import add_alias, duration, subcommand
from snapscale.shared.core.errors import ConfigError, SnapscaleError
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import pid_alive, pids_holding

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HOST = "demo-host"
STEP_COLD = "from zero (cold boot)"
STEP_QUIET = "no traffic (scale to zero)"
STEP_RESTORE = "from zero again (restore)"
STEP_SUSPEND = "no traffic (suspend)"
STEP_RESUME = "traffic again (resume)"


class DemoError(SnapscaleError):
    """The scenario could not go on; the message says which step and what the services logged."""


@dataclass(frozen=True)
class DemoOptions:
    spec_path: Path | None = None
    json_path: Path | None = None
    work_dir: Path | None = None  # default: a fresh temp dir, removed at the end
    keep: bool = False  # keep the work dir (service logs, store) for a look afterwards
    grace_s: float = 6.0  # scale_to_zero_after_s for the demo's deployment
    concurrency: int = 1  # requests sent at once through the gateway at each scale-up
    step_timeout_s: float = 300.0
    freeze_timeout_s: float = 300.0
    resume: bool = False  # also play suspend -> resume
    ask_path: str = "/generate"  # what the demo GETs through the gateway (the sample's answer)
    warm_cache_s: float = 15.0  # how long to wait at zero for the scaler's prefetch into the host cache
    host: str = HOST


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    what = "run nats-server, the services and a gateway here and show cold boot vs restore"
    p = subcommand(sub, "demo", what, "store", "telemetry")
    p.add_argument("--spec", type=Path, help="deployment spec (default: examples/sample_cpu.toml, or GPU)")
    p.add_argument("--json", type=Path, dest="json_path", help="also write the results here as JSON")
    p.add_argument("--work-dir", type=Path, help="where logs, the store and state go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    p.add_argument("--grace", dest="grace_s", type=duration, default="6s", help="no traffic this long: zero")
    p.add_argument("--concurrency", type=int, default=1, help="requests sent at once at each scale-up")
    p.add_argument("--step-timeout", dest="step_timeout_s", type=duration, default="5m", help="step limit")
    p.add_argument("--resume", action="store_true", help="also suspend the replica and resume it")
    p.add_argument("--ask", default="/generate", help="path to GET through the gateway at each scale-up")
    p.add_argument(
        "--warm-cache", dest="warm_cache_s", type=duration, default="15s", help="wait at zero for prefetch"
    )
    for old in ("--grace-s", "--step-timeout-s", "--warm-cache-s"):
        add_alias(p, old, old.removeprefix("--").replace("-", "_"), duration)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    opts = DemoOptions(
        spec_path=args.spec,
        json_path=args.json_path,
        work_dir=args.work_dir,
        keep=args.keep,
        grace_s=args.grace_s,
        concurrency=args.concurrency,
        step_timeout_s=args.step_timeout_s,
        freeze_timeout_s=args.step_timeout_s,
        resume=args.resume,
        ask_path=args.ask,
        warm_cache_s=args.warm_cache_s,
    )
    runtime.setup_logging(os.environ.get("SNAPSCALE_LOG_LEVEL", "WARNING"))
    return run_demo(opts)


def run_demo(opts: DemoOptions) -> int:
    if os.geteuid() != 0:
        raise ConfigError("snapscale demo needs root: sandboxes get their own network namespaces and CRIU")
    # A work dir the user named is theirs to keep; a temp dir goes unless asked to stay.
    keep = opts.keep or opts.work_dir is not None
    work = opts.work_dir or Path(tempfile.mkdtemp(prefix="snapscale-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(work / "logs")
    out = Console(sys.stdout)
    state = DemoState(deployment="")
    rc = 1
    try:
        rc = asyncio.run(_main(opts, work, procs, out, state))
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave sandboxes running.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        out.clear()
        out.say("cleaning up: stopping the scaler, restorer, freezer, gateway and nats-server")
        procs.stop_all()
        killed, nets = reap_sandboxes(work)
        # Checked, not assumed: what the cleanup says is what /proc shows afterwards.
        left = sorted(
            {p for p in killed if pid_alive(p)}
            | {p for p in pids_holding(work) if p != os.getpid()}
            | {m.proc.pid for m in procs.procs if m.proc.poll() is None}
        )
        for line in cleanup_lines(state.live(), len(killed), nets, left):
            out.say(line)
        if keep or rc != 0:
            out.say(f"logs and state kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, previous)
    return rc


async def _main(opts: DemoOptions, work: Path, procs: ProcessSet, out: Console, state: DemoState) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    error = ""
    try:
        await play(opts, work, procs, out, state)
    except asyncio.CancelledError:
        error = "interrupted"
    except DemoError as e:
        error = f"demo failed: {e}"
    out.clear()
    if error:
        out.say(error)
    if state.scale_ups:
        out.say("")
        out.say(summary(state))
    if opts.json_path is not None:
        # Written after a failure too: what got done, and the error, for whoever looks later.
        plain = to_plain(state, work_dir=str(work), error=error or None)
        opts.json_path.write_bytes(orjson.dumps(plain, option=orjson.OPT_INDENT_2))
        out.say(f"results written to {opts.json_path}")
    if error == "interrupted":
        return 130
    return 1 if error else 0


def demo_env(base: dict[str, str], work: Path, nats_url: str, host: str) -> dict[str, str]:
    """The environment every service of the demo gets. Pure. S3 when the caller configured it."""
    env = dict(base)
    env.update(
        SNAPSCALE_NATS_URL=nats_url,
        SNAPSCALE_NAMESPACE=base.get("SNAPSCALE_NAMESPACE", "snapscale"),
        SNAPSCALE_SIGNING_KEY=base.get("SNAPSCALE_SIGNING_KEY") or secrets.token_hex(16),
        SNAPSCALE_STATE_DIR=str(work / "state"),
        SNAPSCALE_CACHE_DIR=str(work / "cache"),
        SNAPSCALE_HOST_ID=host,
        SNAPSCALE_LOG_LEVEL=base.get("SNAPSCALE_LOG_LEVEL", "INFO"),
        # The demo's sample specs run as host processes: a development machine (docs/sandbox.md).
        SNAPSCALE_SANDBOX=base.get("SNAPSCALE_SANDBOX", "host"),
    )
    if not base.get("SNAPSCALE_STORE", "").startswith("s3://"):
        env["SNAPSCALE_STORE"] = f"file://{work / 'store'}"
    return env


def default_spec_path() -> Path:
    return EXAMPLES / ("sample_gpu.toml" if gpu_count() > 0 else "sample_cpu.toml")


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: a CPU machine
        return 0


def demo_spec(d: DeploymentSpec, opts: DemoOptions, *, release_mode: str = "stop") -> DeploymentSpec:
    """The sample spec tuned for a demo: one replica, short windows, freeze after the cold boot;
    the gateway holds a request as long as a step may take (a cold boot on a busy VM is slow)."""
    scaling = replace(
        d.scaling,
        queue_timeout_s=max(d.scaling.queue_timeout_s, opts.step_timeout_s),
        target_concurrency=1.0,
        utilization=1.0,
        min_replicas=0,
        max_replicas=1,
        stable_window_s=max(2.0, opts.grace_s),
        panic_window_s=min(d.scaling.panic_window_s, max(1.0, opts.grace_s / 2)),
        scale_to_zero_after_s=opts.grace_s,
        release_mode=release_mode,  # type: ignore[arg-type]
    )
    return replace(d, scaling=scaling, freeze=replace(d.freeze, after_ready=True, keep_running=True))


async def play(opts: DemoOptions, work: Path, procs: ProcessSet, out: Console, state: DemoState) -> None:
    """The scenario; what it sees goes into `state`, also when it ends early."""
    spec_path = opts.spec_path or default_spec_path()
    if not spec_path.exists():
        raise DemoError(f"no deployment spec at {spec_path} (the sample sandbox lives in examples/)")
    d = demo_spec(load_spec(spec_path), opts)
    state.deployment = d.name

    port = free_port()
    procs.start("nats-server", [find_exe("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js",
                                "-sd", str(work / "jetstream")], dict(os.environ))  # fmt: skip
    await _until(lambda: port_open(port), 15, "nats-server to listen", procs)
    env = demo_env(dict(os.environ), work, f"nats://127.0.0.1:{port}", opts.host)
    settings = Settings.from_env(env)
    telemetry.setup("snapscale-demo", settings.otlp_endpoint)
    store = (
        "S3 " + settings.store.url if settings.store.scheme == "s3" else f"local store {settings.store.url}"
    )
    out.say(f"nats-server on 127.0.0.1:{port}, {store}, work dir {work}")

    # The services run from the checkout, so a spec's relative cwd (the sample's) means the same
    # wherever `snapscale demo` was started.
    me = [sys.executable, "-m", "snapscale"]
    gw_port = free_port()
    for name, argv in (
        ("scaler", [*me, "scaler"]),
        ("restorer", [*me, "restorer", "--host", opts.host]),
        ("freezer", [*me, "freezer", "--host", opts.host]),
        ("gateway", [*me, "gateway", "--listen", f"127.0.0.1:{gw_port}", "--id", "demo-gateway"]),
    ):
        procs.start(name, argv, dict(env, OTEL_SERVICE_NAME=f"snapscale-{name}"), cwd=EXAMPLES.parent)

    b = await bus.open_bus(settings, "snapscale-demo")
    state.begin_step("starting services", time.time())
    try:
        await follow(b, state, out)
        await _until(
            lambda: opts.host in state.hosts, 60, "the restorer's first heartbeat", procs, out, state
        )
        await _until(lambda: port_open(gw_port), 60, "the gateway to listen", procs, out, state)
        await b.kv[Bucket.DEPLOYMENTS].put(d.name, d.to_json())
        out.say(f"deployed {d.name} from {spec_path} (spec hash {d.spec_hash()[:12]}), host {opts.host} up")
        url = f"http://127.0.0.1:{gw_port}/{d.name}{opts.ask_path}"
        out.say(f"gateway on 127.0.0.1:{gw_port}: each scale-up starts with GET {url}")

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
            await _scale_up(state, http, url, STEP_COLD, opts, procs, out)
            await _until(lambda: state.frozen() is not None or _freeze_failed(state), opts.freeze_timeout_s,
                         "the auto-freeze's checkpoint", procs, out, state)  # fmt: skip
            if state.frozen() is None:
                raise DemoError(f"the freeze failed: {state.checkpoints[-1].reason}")
            await _scale_down(state, STEP_QUIET, opts, procs, out, lambda: not state.live())
            await _warm_cache(state, opts, procs, out)
            await _scale_up(state, http, url, STEP_RESTORE, opts, procs, out)
            if opts.resume:
                await b.kv[Bucket.DEPLOYMENTS].put(
                    d.name, demo_spec(d, opts, release_mode="suspend").to_json()
                )
                await _scale_down(state, STEP_SUSPEND, opts, procs, out, lambda: bool(state.suspended()))
                await _scale_up(state, http, url, STEP_RESUME, opts, procs, out)
    finally:
        # The bus logs its own disconnect as a warning; closing on purpose is not one.
        logging.getLogger("snapscale.shared.bus.client").setLevel(logging.ERROR)
        await b.close()
        telemetry.shutdown()


def _freeze_failed(state: DemoState) -> bool:
    return any(not c.ok for c in state.checkpoints)


async def _scale_up(
    state: DemoState,
    http: aiohttp.ClientSession,
    url: str,
    step: str,
    opts: DemoOptions,
    procs: ProcessSet,
    out: Console,
) -> ScaleUp:
    """A user's requests at zero: held by the gateway while the scaler brings a replica up, then
    answered. The step ends with the first answer (no more requests: the replica may go again)."""
    state.begin_step(step, time.time())
    asking = asyncio.create_task(first_answer(http, url, opts.concurrency, opts.step_timeout_s))
    try:
        await _until(lambda: bool(state.ready_in_step(step)) or _failed_in_step(state, step),
                     opts.step_timeout_s, f"a ready replica ({step})", procs, out, state)  # fmt: skip
        ups = state.ready_in_step(step)
        if not ups:
            failed = [s for s in state.scale_ups if s.step == step and s.failed]
            raise DemoError(f"{step}: replica {failed[0].replica} failed: {failed[0].failed}")
        await _until(asking.done, 60, "the first answer through the gateway", procs, out, state)
    finally:
        asking.cancel()
    up = ups[0]
    got = asking.result()
    up.first_request_at, up.first_answer_at = got.sent_at, got.answered_at
    up.answer = got.text if got.answered_at is not None else f"no answer ({got.status}: {got.text})"
    first = next((s.answer for s in state.scale_ups if s.answer), up.answer)
    same = (
        " (the same answer as the first replica)"
        if up is not state.scale_ups[0] and up.answer == first
        else ""
    )
    tier = up.tier.value if up.tier else "?"
    out.say(f"{step}: {up.replica} ready by {tier} in {up.time_to_ready_s or 0:.2f}s at {up.endpoint}")
    felt = f"answered {up.time_to_first_answer_s:.2f}s after it was sent" if up.time_to_first_answer_s else ""
    out.say(f"  GET {opts.ask_path} through the gateway, {felt or 'not answered'}: {_short(up.answer)}{same}")
    if step != STEP_COLD and up.tier is Tier.COLD:
        # A fallback is the system working as designed, but it is not what this step is to show.
        out.say(f"  this comeback fell back to a cold boot: {up.reason}")
    return up


def _short(answer: str, n: int = 100) -> str:
    return answer if len(answer) <= n else answer[: n - 3] + "..."


async def _warm_cache(state: DemoState, opts: DemoOptions, procs: ProcessSet, out: Console) -> None:
    """At zero the scaler asks hosts to prefetch the checkpoint; give it a moment, as idle time
    between bursts would in production, so the next scale-up can restore from the host cache."""
    ck = state.frozen()
    if ck is None or ck.checkpoint_id is None or opts.warm_cache_s <= 0:
        return
    cid = ck.checkpoint_id
    try:
        await _until(
            lambda: state.cached_on(opts.host, cid), opts.warm_cache_s, "prefetch", procs, out, state
        )
        out.say(f"checkpoint {cid} is in {opts.host}'s cache")
    except DemoError as e:
        if procs.dead():
            raise
        out.say(f"no prefetch into the host cache yet ({e}); the restore will fetch from the store")


def _failed_in_step(state: DemoState, step: str) -> bool:
    return any(s.step == step and s.failed for s in state.scale_ups)


async def _scale_down(
    state: DemoState, step: str, opts: DemoOptions, procs: ProcessSet, out: Console, done: Callable[[], bool]
) -> None:
    state.begin_step(step, time.time())
    await _until(done, opts.step_timeout_s + opts.grace_s, step, procs, out, state)
    out.say(f"{step}: done after {time.time() - state.step_started_at:.1f}s")


async def _until(
    cond: Callable[[], bool],
    timeout_s: float,
    what: str,
    procs: ProcessSet,
    out: Console | None = None,
    state: DemoState | None = None,
) -> None:
    """Wait for `cond`, showing the status line; a service that dies or a timeout ends the demo."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        dead = procs.dead()
        if dead:
            m = dead[0]
            raise DemoError(
                f"{m.name} exited with {m.proc.returncode} while waiting for {what}; its log ends:\n"
                + log_tail(m.log_path)
            )
        if time.monotonic() > deadline:
            raise DemoError(f"no {what} after {timeout_s:.0f}s; service logs are in {procs.log_dir}")
        if out is not None and state is not None:
            out.status(state.status_line(time.time()))
        await asyncio.sleep(0.1)
