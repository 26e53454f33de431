"""The scaler's two numbers: pure policy decisions per second (one core, 10,000 deployments), and
traffic event -> restore command latency over loopback NATS at 1,000 events/s across 100
deployments, with `snapscale scaler` in its own process and this one playing gateway and host.

Bounded: each part stops by itself. Run: .venv/bin/python bench/scaler.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg

from snapscale.demo.procs import free_port, wait_port
from snapscale.restorer import events
from snapscale.scaler.policy import decide
from snapscale.scaler.window import Window
from snapscale.shared import bus
from snapscale.shared.bus import catalog
from snapscale.shared.bus.catalog import CatalogEntry
from snapscale.shared.bus.client import Bus
from snapscale.shared.bus.messages import decode_command
from snapscale.shared.bus.spec import DeploymentSpec, ScalingSpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine import procs

REPO = Path(__file__).resolve().parent.parent


# --- part 1: pure decisions -----------------------------------------------------------------------
# every knob that adds work to a decision switched on (issue 18): the scale-down delay's window,
# activation scale, the grace counted from inactivity
ALL_KNOBS = ScalingSpec(scale_down_delay_s=60.0, activation_scale=2, scale_to_zero_grace_from="inactive")


def decisions_per_s(deployments: int, rounds: int, spec: ScalingSpec | None = None) -> tuple[float, float]:
    """(decide() alone, record() + decide()) per second over `deployments` windows, one thread."""
    spec = spec or ScalingSpec()
    rng = random.Random(7)
    windows = [Window(spec, 0.0) for _ in range(deployments)]
    for w in windows:
        for s in range(60):
            w.record(s + 0.5, rng.uniform(0, 20), 1)
    current = [rng.randint(1, 10) for _ in range(deployments)]
    now = 60.0
    t_decide = 0.0
    t_both = 0.0
    for _ in range(rounds):
        now += 1.0
        t0 = time.perf_counter()
        for w in windows:
            w.record(now, 5.0, 1)
        t1 = time.perf_counter()
        for i, w in enumerate(windows):
            decide(w, spec, current[i], now + 0.5)
        t2 = time.perf_counter()
        t_decide += t2 - t1
        t_both += t2 - t0
    n = deployments * rounds
    return n / t_decide, n / t_both


# --- part 2: latency over loopback NATS ------------------------------------------------------------
def start_nats(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = Path(sys.executable).parent / "nats-server"
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise TimeoutError("nats-server did not start") from None
    return proc, f"nats://127.0.0.1:{port}"


@dataclass
class Dep:
    name: str
    on_until: float = 0.0  # sending traffic until then
    live: int = 0  # replicas up or coming, as the host sees them
    woke_at: float | None = None  # when the first event of an activation was published
    next_on: float = 0.0


@dataclass
class Harness:
    """Gateway and host in one: traffic in on/off phases, commands answered at once."""

    b: Bus
    deps: dict[str, Dep]
    on_s: float
    latencies_ms: list[float] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)
    sent: int = 0
    restores: int = 0
    releases: int = 0
    other: int = 0

    async def seen_restore(self, m: Msg) -> None:
        """The moment the command is on the wire (a core subscription; the answer comes from the
        durable consumer, whose pull round trips would otherwise count as scaler latency)."""
        now = time.time()
        c = decode_command(m.data, "scale-up")
        d = self.deps[c.deployment]
        if d.woke_at is not None and d.woke_at > 0:
            self.latencies_ms.append((now - d.woke_at) * 1000)
            self.samples.append((now, (now - d.woke_at) * 1000))
            d.woke_at = None
        d.live += 1

    async def on_scale_up(self, c: bus.ScaleUpCommand, _m: Msg) -> None:
        now = time.time()
        self.restores += 1
        ev = bus.ReplicaEvent(
            c.deployment, c.replica, "bench-host", bus.ReplicaState.READY, now, c.id, bus.Tier.CACHE
        )
        await events.record(self.b, ev)

    async def on_release(self, c: bus.ReleaseCommand, _m: Msg) -> None:
        d = self.deps[c.deployment]
        d.live = max(0, d.live - 1)
        self.releases += 1
        await events.record(
            self.b,
            bus.ReplicaEvent(
                c.deployment, c.replica, "bench-host", bus.ReplicaState.STOPPED, time.time(), c.id
            ),
        )
        if d.live == 0:
            d.next_on = time.monotonic() + random.uniform(0.1, 0.4)

    async def on_freeze(self, c: bus.FreezeCommand, _m: Msg) -> None:
        self.other += 1
        ck = f"ck-{c.deployment}"
        entry = CatalogEntry(c.deployment, "bench", ck, f"m/{ck}.json", time.time(), "bench-host")
        await catalog.publish_entry(self.b.kv[Bucket.CHECKPOINTS], entry)
        ev = bus.CheckpointEvent(c.deployment, "bench-host", True, time.time(), c.id, ck, c.replica, "bench")
        await bus.publish(self.b, self.b.subjects.evt_checkpoint(c.deployment), ev)

    async def on_prefetch(self, _c: bus.PrefetchCommand, _m: Msg) -> None:
        self.other += 1

    async def heartbeats(self, stop: asyncio.Event) -> None:
        gpus = [bus.GpuInfo(i, f"g{i}", "H100", 80 << 30) for i in range(8)]
        while not stop.is_set():
            hb = bus.HostHeartbeat(
                "bench-host", time.time(), "bench", gpus=gpus, cpu_slots=10_000, interval_s=1.0
            )
            await bus.publish_core(self.b, self.b.subjects.evt_host("bench-host"), hb)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def traffic(self, stop: asyncio.Event, events_per_s: float, seconds: float) -> None:
        """`events_per_s` spread over the deployments in an on phase; a deployment at zero whose
        pause is over starts a phase, and its first event is the one whose latency counts."""
        period = 0.01
        t_start = last = time.monotonic()
        owed = 0.0
        names = list(self.deps)
        for d in self.deps.values():  # staggered: 100 deployments waking in the same 10 ms is no workload
            d.next_on = t_start + random.uniform(0.0, 2.0)
        while not stop.is_set() and time.monotonic() - t_start < seconds:
            await asyncio.sleep(period)
            now = time.monotonic()
            # pace by elapsed time, not by loop turns: a late turn sends what it owes (bounded)
            owed = min(owed + events_per_s * (now - last), events_per_s * 0.1)
            last = now
            for d in self.deps.values():
                if d.live == 0 and d.woke_at is None and d.on_until < now and now >= d.next_on:
                    d.on_until = now + self.on_s
                    d.woke_at = -1.0  # the next event sent for it sets the time
            active = [n for n in names if self.deps[n].on_until >= now]
            while active and owed >= 1.0:
                owed -= 1.0
                d = self.deps[active[self.sent % len(active)]]
                ev = bus.TrafficEvent(d.name, time.time(), arrivals=1, concurrency=1.0)
                if d.woke_at == -1.0:
                    d.woke_at = time.time()
                await self.b.nc.publish(self.b.subjects.traffic(d.name), bus.encode_message(ev))
                self.sent += 1


async def latency(
    nats_url: str, tmp: Path, n_deps: int, events_per_s: float, seconds: float
) -> dict[str, float]:
    settings = Settings(nats_url=nats_url, namespace="bench", state_dir=tmp / "state", host_id="bench")
    b = await bus.open_bus(settings, "bench-harness")
    scaling = ScalingSpec(
        target_concurrency=1.0, utilization=1.0, stable_window_s=1.0, panic_window_s=1.0,
        scale_to_zero_after_s=0.5, max_replicas=4, release_mode="stop",
    )  # fmt: skip
    deps = {f"d{i:03d}": Dep(f"d{i:03d}") for i in range(n_deps)}
    for name in deps:
        await b.kv[Bucket.DEPLOYMENTS].put(
            name, DeploymentSpec(name=name, command=["x"], scaling=scaling).to_json()
        )
    h = Harness(b, deps, on_s=2.0)
    env = {
        **os.environ,
        "SNAPSCALE_NATS_URL": nats_url,
        "SNAPSCALE_NAMESPACE": "bench",
        "SNAPSCALE_STATE_DIR": str(tmp / "state"),
        "SNAPSCALE_HOST_ID": "bench-scaler",
        "SNAPSCALE_LOG_LEVEL": "WARNING",
    }
    scaler = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapscale", "scaler", "--tick-s", "0.1", "--lease-s", "2",
        env=env, stderr=(tmp / "scaler.log").open("wb"),
    )  # fmt: skip
    stop = asyncio.Event()
    s = b.subjects

    def durable(v: Verb) -> tuple[str, str]:
        return s.cmd(v, "bench-host"), f"bench-{v.value}"

    consumers = [
        asyncio.create_task(
            bus.consume(b, *durable(Verb.SCALE_UP), bus.ScaleUpCommand, h.on_scale_up, stop=stop)
        ),
        asyncio.create_task(
            bus.consume(b, *durable(Verb.RELEASE), bus.ReleaseCommand, h.on_release, stop=stop)
        ),
        asyncio.create_task(bus.consume(b, *durable(Verb.FREEZE), bus.FreezeCommand, h.on_freeze, stop=stop)),
        asyncio.create_task(
            bus.consume(b, *durable(Verb.PREFETCH), bus.PrefetchCommand, h.on_prefetch, stop=stop)
        ),
    ]
    await b.nc.subscribe(s.cmd(Verb.SCALE_UP, "bench-host"), cb=h.seen_restore)
    beats = asyncio.create_task(h.heartbeats(stop))
    try:
        deadline = time.monotonic() + 30
        while await bus.kv_get(b.kv[Bucket.LEASES], "scaler.leader") is None:
            if time.monotonic() > deadline or scaler.returncode is not None:
                raise RuntimeError(f"the scaler did not lead: {(tmp / 'scaler.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # the scaler has seen the host's heartbeat and the specs
        cpu_before = procs.cpu_seconds(scaler.pid)
        t0 = time.monotonic()
        await h.traffic(stop, events_per_s, seconds)
        elapsed = time.monotonic() - t0
        cpu_s = procs.cpu_seconds(scaler.pid) - cpu_before
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*consumers, beats, return_exceptions=True)
        scaler.terminate()
        await asyncio.wait_for(scaler.wait(), 15)
        await b.nc.close()
    lat = sorted(h.latencies_ms)
    if os.environ.get("BENCH_DEBUG"):
        t0s = h.samples[0][0]
        for t, ms in sorted(h.samples, key=lambda x: -x[1])[:25]:
            print(f"  {t - t0s:8.3f}s {ms:7.2f} ms")
    if len(lat) < 20:
        raise RuntimeError(f"only {len(lat)} activations measured; see {tmp / 'scaler.log'}")
    return {
        "events_per_s": h.sent / elapsed,
        "events": h.sent,
        "activations": len(lat),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "max_ms": lat[-1],
        "restores": h.restores,
        "scaler_cpu_pct": 100 * cpu_s / elapsed,
        "releases": h.releases,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--deployments", type=int, default=10_000, help="windows for the decisions/s part")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--latency-deployments", type=int, default=100)
    p.add_argument("--events-per-s", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument(
        "--store-dir", default=None, help="where nats-server keeps JetStream (default: the temp dir)"
    )
    args = p.parse_args()

    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load}")
    for label, spec in (("default knobs", None), ("all knobs on", ALL_KNOBS)):
        only_decide, with_record = decisions_per_s(args.deployments, args.rounds, spec)
        print(
            f"decisions ({label}): {args.deployments} deployments x {args.rounds} rounds: "
            f"{only_decide:,.0f} decide()/s; {with_record:,.0f} (record + decide)/s on one core"
        )
    with tempfile.TemporaryDirectory(prefix="bench-scaler-", dir=args.store_dir) as d:
        tmp = Path(d)
        proc, url = start_nats(tmp)
        try:
            r = asyncio.run(latency(url, tmp, args.latency_deployments, args.events_per_s, args.seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"latency: {r['events']:.0f} events at {r['events_per_s']:.0f}/s over {args.latency_deployments} "
        f"deployments; {r['activations']:.0f} activations: traffic event -> restore command "
        f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms "
        f"({r['restores']:.0f} restores, {r['releases']:.0f} releases); "
        f"the scaler process used {r['scaler_cpu_pct']:.0f}% of one core"
    )
    print(f"# load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
