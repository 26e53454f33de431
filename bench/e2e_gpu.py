"""End to end through the whole control plane: nats-server, scaler, restorer and freezer as separate
processes, the local file store, the sample sandbox (GPU `llama-0.8b`, or `--cpu` the tiny one).

Scenario: cold boot -> auto-freeze -> scale to zero -> restore (host cache cold: chunks from the store)
-> scale to zero -> restore (host cache warm) -> suspend -> [engine.restore alone on the same image]
-> resume. Every scale-up is timed from its first traffic event to the replica's first answer, which
must equal the cold-booted replica's byte for byte. Needs root, CRIU; run from the repo root:
`python3 -m bench.e2e_gpu --out DIR [--cpu]`. Leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.e2e_report import Raw, Up, ratios, table
from snapscale.demo import DemoOptions, demo_env, demo_spec
from snapscale.demo.live import Console, follow
from snapscale.demo.procs import (
    ProcessSet,
    find_exe,
    free_port,
    log_tail,
    port_open,
    reap_sandboxes,
    wait_port,
)
from snapscale.demo.report import DemoState
from snapscale.restorer.config import RestorerConfig
from snapscale.shared import bus, engine
from snapscale.shared.bus import spec
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.messages import TrafficEvent
from snapscale.shared.bus.subjects import Bucket
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import find_criu
from snapscale.shared.store.assemble import materialize
from snapscale.shared.store.backend import manifest_key, open_store
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.checkpoint import fetch_manifest
from snapscale.shared.store.prefetch import Prefetcher

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
HOST = "e2e-host"
STEPS = ("cold boot", "restore, host cache cold", "restore, host cache warm", "resume",
         "restore, host cache warm, hot image removed")  # fmt: skip


class BenchError(RuntimeError):
    """The scenario could not go on; says which step and what the services logged."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the deployment ----------------------------------------------------------------------------
def gpu_spec(work: Path, kv_gib: int, weights_outside: bool = False) -> spec.DeploymentSpec:
    """The GPU sample at the engine bench's size: 0.84 B params bf16 from safetensors, compile,
    CUDA graph, a KV cache of `kv_gib` with the hooks that drop it before a freeze; with
    `weights_outside`, its weights outside the image (docs/weights.md)."""
    skip = ("OUT", "PWD", "OLDPWD", "SHLVL", "_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPSCALE_", "OTEL_")) and k not in skip}
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no compile-worker pool: fewer processes to freeze
    cmd = [sys.executable, "-m", "examples.sample_server.server", "--preset", "llama-0.8b", "--device",
           "cuda", "--dtype", "bf16", "--compile", "--graph", "--kv-mib", str(kv_gib * 1024),
           "--weights", str(work / "model.safetensors"), "--port", "8000"]  # fmt: skip
    if weights_outside:
        cmd.append("--weights-outside")
    return spec.DeploymentSpec(
        name="sample-gpu",
        command=cmd,
        env=env,
        cwd=str(ROOT),
        port=8000,
        gpus=1,
        image=["examples/sample_server"],
        hooks=spec.HooksSpec(
            before_freeze="/hooks/before_freeze", after_restore="/hooks/after_restore", timeout_s=120
        ),
        ready=spec.ReadySpec(http_path="/healthz", timeout_s=600, interval_s=0.05),
    )


def write_weights(path: Path) -> None:
    """In a child process, so this one never holds a CUDA context (or GPU memory) of its own."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    code = "import sys; from pathlib import Path; from bench.engine_gpu import write_weights; " \
           "write_weights(Path(sys.argv[1]))"  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True)


def gpu_uuids() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
                for i in range(pynvml.nvmlDeviceGetCount())]  # fmt: skip
    except Exception:  # no driver: the CPU run
        return []


def gpu_info() -> list[str]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, check=False,
    ).stdout if shutil.which("nvidia-smi") else ""  # fmt: skip
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


# --- the gateway's part ------------------------------------------------------------------------
class Gateway:
    """Traffic events every half second while on; the first one goes out the moment it is turned
    on, and its time is what every scale-up is measured from."""

    def __init__(self, b: Bus, deployment: str) -> None:
        self.bus = b
        self.deployment = deployment
        self.on = asyncio.Event()
        self.first_at = 0.0

    async def start(self) -> float:
        self.first_at = time.time()
        await self._send()
        self.on.set()
        return self.first_at

    def stop(self) -> None:
        self.on.clear()

    async def _send(self) -> None:
        ev = TrafficEvent(deployment=self.deployment, ts=time.time(), arrivals=1, concurrency=1.0)
        await bus.publish_core(self.bus, self.bus.subjects.traffic(self.deployment), ev)

    async def run(self) -> None:
        while True:
            await self.on.wait()
            await asyncio.sleep(0.5)
            if self.on.is_set():
                await self._send()


# --- steps ---------------------------------------------------------------------------------------
async def until(cond: Any, timeout_s: float, what: str, procs: ProcessSet) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        for m in procs.dead():
            tail = log_tail(m.log_path)
            raise BenchError(f"{m.name} exited ({m.proc.returncode}) waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} after {timeout_s:.0f}s; logs in {procs.log_dir}")
        await asyncio.sleep(0.01)


async def first_answer(endpoint: str, timeout_s: float = 120) -> tuple[bytes, float]:
    """The replica's first 200 answer to GET /generate and the unix time it arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, body = await probe.http_request("GET", endpoint, "/generate", timeout_s=timeout_s)
            if status == 200:
                return body, time.time()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{endpoint} gave no answer to /generate in {timeout_s:.0f}s")
        await asyncio.sleep(0.01)


async def scale_up(
    state: DemoState, gw: Gateway, step: str, ref: bytes | None, procs: ProcessSet, timeout_s: float
) -> tuple[Up, bytes]:
    state.begin_step(step, time.time())
    t0 = await gw.start()
    failed = [False]

    def done() -> bool:
        failed[0] = any(s.step == step and s.failed for s in state.scale_ups)
        return bool(state.ready_in_step(step)) or failed[0]

    await until(done, timeout_s, f"a ready replica ({step})", procs)
    ready = state.ready_in_step(step)
    if not ready:
        bad = next(s for s in state.scale_ups if s.step == step and s.failed)
        raise BenchError(f"{step}: replica {bad.replica} failed: {bad.failed}")
    s = ready[0]
    body, at = await first_answer(s.endpoint)
    up = Up(
        step=step,
        tier=s.tier.value if s.tier else "?",
        replica=s.replica,
        to_ready_event_s=(s.ready_at or at) - t0,
        to_first_answer_s=at - t0,
        answer_identical=ref is None or body == ref,
        phases_s=dict(s.timings_s),
        bytes=dict(s.bytes),
        reason=s.reason,
    )
    say(f"{step}: {up.replica} by {up.tier}, ready event {up.to_ready_event_s:.2f}s, first answer "
        f"{up.to_first_answer_s:.2f}s, same as cold: {up.answer_identical}; {up.phases_s}")  # fmt: skip
    return up, body


async def scale_down(state: DemoState, gw: Gateway, step: str, cond: Any, procs: ProcessSet) -> None:
    state.begin_step(step, time.time())
    gw.stop()
    s = time.monotonic()
    await until(cond, 120, step, procs)
    say(f"{step}: done after {time.monotonic() - s:.1f}s")


async def raw_restore(
    settings: Settings, d: spec.DeploymentSpec, cid: str, work: Path, ref: bytes, gpus: list[str]
) -> Raw:
    """engine.restore alone on the checkpoint's image, rebuilt by the bench before the clock starts."""
    img = work / "raw" / "image"
    shutil.rmtree(work / "raw", ignore_errors=True)
    async with open_store(settings.store) as store:
        m = await fetch_manifest(store, manifest_key(d.name, cid), settings.require_signing_key())
        cache = HostCache(work / "raw" / "cache", m.total_bytes * 2 + (1 << 30))
        await Prefetcher(store, cache).prefetch(m)
        s = time.monotonic()
        await materialize(cache, m, img)
        mat = time.monotonic() - s
    s = time.monotonic()
    sb, rep = await engine.restore(d, img, "e2e-raw", gpu_uuids=gpus, run_dir=work / "raw" / "run",
                                   criu=find_criu(settings.criu_path), checkpoint_id=cid)  # fmt: skip
    try:
        body, _ = await first_answer(sb.endpoint)
        took = time.monotonic() - s
    finally:
        await engine.stop(sb)
    raw = Raw(took, dict(rep.timings_s), materialize_s=mat, answer_identical=body == ref)
    say(f"engine.restore alone: first answer {took:.2f}s {rep.timings_s}, same: {raw.answer_identical}")
    return raw


# --- the run ---------------------------------------------------------------------------------------
async def play(args: argparse.Namespace, work: Path, procs: ProcessSet, results: dict[str, Any]) -> None:
    gpus = [] if args.cpu else gpu_uuids()
    if args.cpu:
        base = spec.load_spec(ROOT / "examples" / "sample_cpu_quick.toml")
    else:
        if not gpus:
            raise BenchError("no GPU found (NVML); use --cpu on a machine without one")
        write_weights(work / "model.safetensors")
        base = gpu_spec(work, args.kv_gib, args.weights_outside)
    d = demo_spec(base, DemoOptions(grace_s=args.grace_s))
    results.update(deployment=d.name, spec_hash=d.spec_hash(), gpus=gpu_info(), command=base.command)

    port = free_port()
    procs.start("nats-server", [find_exe("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js",
                                "-sd", str(work / "jetstream")], dict(os.environ))  # fmt: skip
    await until(lambda: port_open(port), 15, "nats-server to listen", procs)
    env = demo_env(dict(os.environ), work, f"nats://127.0.0.1:{port}", HOST)
    if args.hot_images is not None:
        env["SNAPSCALE_HOT_IMAGES"] = str(args.hot_images)
    settings = Settings.from_env(env)
    me = [sys.executable, "-m"]
    # The scaler without its prefetch at zero, so the first restore finds the host cache cold.
    procs.start("scaler", [*me, "bench.e2e_gpu", "--scaler"], env, cwd=ROOT)
    procs.start("restorer", [*me, "snapscale", "restorer", "--host", HOST], env, cwd=ROOT)
    procs.start("freezer", [*me, "snapscale", "freezer", "--host", HOST], env, cwd=ROOT)

    b = await bus.open_bus(settings, "snapscale-e2e")
    state = DemoState(deployment=d.name)
    gw = Gateway(b, d.name)
    gw_task = asyncio.create_task(gw.run(), name="e2e traffic")
    ups: list[Up] = []
    results["scale_ups"] = ups
    try:
        await follow(b, state, Console(sys.stdout))
        await until(lambda: HOST in state.hosts, 60, "the restorer's first heartbeat", procs)
        await b.kv[Bucket.DEPLOYMENTS].put(d.name, d.to_json())
        say(f"deployed {d.name} (spec hash {d.spec_hash()[:12]}) on {HOST}; GPUs {gpus or 'none'}")

        cold, ref = await scale_up(state, gw, STEPS[0], None, procs, args.step_timeout_s)
        ups.append(cold)
        results["reference_answer"] = ref.decode(errors="replace")
        await until(lambda: state.frozen() is not None or any(not c.ok for c in state.checkpoints),
                    args.step_timeout_s, "the auto-freeze", procs)  # fmt: skip
        ck = state.frozen()
        if ck is None or ck.checkpoint_id is None:
            raise BenchError(f"the freeze failed: {state.checkpoints[-1].reason}")
        results["checkpoint"] = {"id": ck.checkpoint_id, "sizes": ck.sizes, "timings_s": ck.timings_s}
        say(f"frozen {ck.checkpoint_id}: {ck.sizes} {ck.timings_s}")

        steps = list(STEPS[1:3])
        if not args.no_compare:
            steps.append(STEPS[4])
        for step in steps:
            await scale_down(state, gw, f"to zero before '{step}'", lambda: not state.live(), procs)
            if step == STEPS[4]:
                # The restorer's kept image gone: this restore assembles it again from the host cache
                # (prefetch re-verifies, materialize copies), as every warm restore did before.
                # Where the restorer keeps it: SNAPSCALE_IMAGE_DIR when set (a tmpfs on GPU hosts).
                hot = RestorerConfig.from_env(HOST, env).hot_root(settings) / ck.checkpoint_id
                shutil.rmtree(hot)
            up, _ = await scale_up(state, gw, step, ref, procs, args.step_timeout_s)
            ups.append(up)

        await b.kv[Bucket.DEPLOYMENTS].put(
            d.name, demo_spec(base, DemoOptions(grace_s=args.grace_s), release_mode="suspend").to_json()
        )
        await scale_down(state, gw, "suspend", lambda: bool(state.suspended()), procs)
        results["gpu_mem_suspended"] = gpu_info()
        if not args.no_raw:
            raw = await raw_restore(settings, d, ck.checkpoint_id, work, ref, gpus[:1])
            results["raw"] = raw
        up, _ = await scale_up(state, gw, STEPS[3], ref, procs, args.step_timeout_s)
        ups.append(up)
        gw.stop()
    finally:
        gw_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gw_task
        logging.getLogger("snapscale.shared.bus.client").setLevel(logging.ERROR)
        await b.close()


def plain(results: dict[str, Any]) -> dict[str, Any]:
    out = dict(results)
    ups: list[Up] = out.pop("scale_ups", [])
    raw: Raw | None = out.pop("raw", None)
    out["scale_ups"] = [u.to_plain() for u in ups]
    out["raw"] = None if raw is None else raw.__dict__
    out["ratios"] = ratios(ups, raw)
    return out


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("needs root: sandboxes get network namespaces, CRIU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    for sub in ("jetstream", "state", "cache", "store", "raw", "logs"):
        shutil.rmtree(work / sub, ignore_errors=True)  # a fresh run; the weights file stays
    work.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(work / "logs")
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": args.cpu}
    rc = 1
    t0 = time.monotonic()
    try:
        os.environ.setdefault("SNAPSCALE_SANDBOX", "host")  # dev mode: host-process sandboxes
        if args.s3:
            results["store"] = os.environ["SNAPSCALE_STORE"] = s3_store(procs)
        asyncio.run(play(args, work, procs, results))
        rc = 0
    except BenchError as e:
        results["error"] = str(e)
        say(f"FAILED: {e}")
    finally:
        procs.stop_all()
        killed, nets = reap_sandboxes(work)
        if killed:
            say(f"stopped {len(killed)} sandbox processes left running, removed netns {nets}")
        results["wall_s"] = round(time.monotonic() - t0, 1)
        p = plain(results)
        (out / "e2e.json").write_text(json.dumps(p, indent=1, sort_keys=True, default=str))
        for name in ("scaler", "restorer", "freezer"):
            with contextlib.suppress(OSError):
                shutil.copy(work / "logs" / f"{name}.log", out / f"{name}.log")
    ups: list[Up] = results.get("scale_ups", [])
    if ups:
        image = int(results.get("checkpoint", {}).get("sizes", {}).get("total", 0))
        print(table(ups, results.get("raw"), image), flush=True)
    bad = [u.step for u in ups if not u.answer_identical]
    if bad:
        say(f"answers differ from the cold boot's at: {bad}")
        rc = 1
    return rc


def s3_store(procs: ProcessSet) -> str:
    """moto's S3 server on loopback, stopped with the services: the store the services are given
    (its endpoint and credentials in this process's environment, which they inherit)."""
    import boto3

    from bench.prefetch import moto_argv

    port = free_port()
    procs.start("moto", moto_argv(port), dict(os.environ))
    wait_port(port, timeout_s=20.0)
    ep = f"http://127.0.0.1:{port}"
    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                 ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", ep)):  # fmt: skip
        os.environ.setdefault(k, v)
    boto3.client("s3", endpoint_url=ep, region_name="us-east-1").create_bucket(Bucket="e2e")
    say(f"store: moto's S3 server at {ep}")
    return "s3://e2e/store"


def run_scaler() -> int:
    """The scaler service, as `snapscale scaler` runs it, without the prefetch at zero."""
    from snapscale.scaler.config import ScalerConfig
    from snapscale.scaler.service import Scaler
    from snapscale.shared.core import runtime

    s = Settings.from_env()
    runtime.setup_logging(s.log_level)

    async def go() -> None:
        stop = asyncio.Event()
        runtime.install_stop_signals(stop)
        await Scaler(s, ScalerConfig(prefetch_hosts=0)).run(stop)

    runtime.run(go)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/e2e-out", help="e2e.json and the services' logs go here")
    p.add_argument("--work", default="/tmp/e2e-work", help="store, cache, state, logs, weights")
    p.add_argument("--cpu", action="store_true", help="the CPU sample (tiny), for a machine without GPU")
    p.add_argument("--kv-gib", type=int, default=4)
    p.add_argument("--grace-s", type=float, default=4.0, help="no traffic for this long: scale to zero")
    p.add_argument("--step-timeout-s", type=float, default=300.0)
    p.add_argument("--no-raw", action="store_true", help="skip engine.restore alone")
    p.add_argument("--no-compare", action="store_true", help="skip the warm restore without its hot image")
    p.add_argument("--hot-images", type=int, default=None, help="SNAPSCALE_HOT_IMAGES for the restorer")
    p.add_argument("--weights-outside", action="store_true", help="the sample's weights outside the image")
    p.add_argument("--s3", action="store_true", help="the store on moto's S3 server (loopback), not files")
    p.add_argument("--scaler", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    sys.exit(run_scaler() if a.scaler else main(a))
