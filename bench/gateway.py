"""The gateway's two numbers, side by side in one run.

1. Added latency: open-loop GETs at fixed rates (default 1,000 and 5,000 requests/s), straight to a
   replica and through `snapscale gateway` (its own process: one event loop, so at most one core;
   `--gateway-cpu` pins it), the two alternating in rounds; the gateway's p50 and p99 minus the
   direct ones, and the gateway's CPU a request. Target: p99 added <= 1 ms at 1,000 requests/s
   on one core.
2. Held request: a deployment at zero, one request held by the gateway, then the replica's ready
   record written to KV (as the restorer writes it); the request's answer time minus the moment
   the record was written. Target <= 20 ms.

The replica is a minimal keep-alive HTTP server in its own process (a sandbox's speed is not the
point), the load generator a minimal keep-alive client: both cost little, so the difference is the
gateway. Bounded: each phase stops by itself.

Run: .venv/bin/python -m bench.gateway [--seconds 5] [--rates 1000,5000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from snapscale.demo.procs import find_exe, free_port, wait_port
from snapscale.shared import bus
from snapscale.shared.bus import Bucket, DeploymentSpec, ReplicaEvent, ReplicaState, encode_message
from snapscale.shared.core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "bench"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


# --- the replica: answers every request with "ok", keep-alive ---------------------------------
class _ReplicaProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4 :]  # GETs only: no body
            self.t.write(ANSWER)


async def _serve_replica(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_ReplicaProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- the load generator -------------------------------------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; reads a Content-Length answer."""

    def __init__(self) -> None:
        self.t: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].lower()
        i = head.find(b"content-length:")
        n = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
        if len(self.buf) < end + 4 + n:
            return
        status = int(self.buf[9:12])
        self.buf = self.buf[end + 4 + n :]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)


@dataclass
class Phase:
    target: str
    rate: float
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    late_ms: list[float] = field(default_factory=list)  # how far behind its schedule each send was
    gateway_cpu_s: float = 0.0
    wall_s: float = 0.0  # the phase from its first send to its last answer

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def open_loop(host: str, port: int, path: str, rate: float, seconds: float, phase: Phase) -> None:
    """Send GETs at `rate` for `seconds` on as many keep-alive connections as are needed."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    idle: list[_Conn] = []
    inflight: set[asyncio.Task[None]] = set()

    async def one(conn: _Conn) -> None:
        assert conn.t is not None
        conn.waiter = loop.create_future()
        t0 = time.perf_counter()
        conn.t.write(request)
        try:
            status = await conn.waiter
        except ConnectionError:
            phase.errors += 1
            return
        dt = (time.perf_counter() - t0) * 1e3
        if status == 200:
            phase.latencies_ms.append(dt)
        else:
            phase.errors += 1
        if not conn.lost:
            idle.append(conn)

    n = int(rate * seconds)
    start = loop.time() + 0.05
    for i in range(n):
        due = start + i / rate
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        phase.late_ms.append(max(0.0, (loop.time() - due) * 1e3))
        if idle:
            conn = idle.pop()
        else:
            _t, conn = await loop.create_connection(_Conn, host, port)
        task = loop.create_task(one(conn))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.wait(inflight, timeout=10)
    for c in idle:
        if c.t is not None:
            c.t.close()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (and its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the held request ----------------------------------------------------------------------------
async def held_latencies(b: bus.Bus, gw_port: int, ep: str, n: int) -> list[float]:
    """`n` times: a request to a deployment with no replica, the ready record 0.3 s later; the
    answer's arrival minus the moment the record was written (before the KV put, conservatively)."""
    import aiohttp

    dep = "held"
    spec = DeploymentSpec(name=dep, command=["serve"])
    await b.kv[Bucket.DEPLOYMENTS].put(dep, spec.to_json())
    kv = b.kv[Bucket.REPLICAS]
    out: list[float] = []
    async with aiohttp.ClientSession() as http:
        await asyncio.sleep(0.3)
        for i in range(n):
            key = f"{dep}.r{i}"

            async def get() -> float:
                async with http.get(f"http://127.0.0.1:{gw_port}/{dep}/x") as r:
                    await r.read()
                    assert r.status == 200, r.status
                return time.perf_counter()

            task = asyncio.create_task(get())
            await asyncio.sleep(0.3)
            assert not task.done(), "the request was not held"
            t_ready = time.perf_counter()
            ev = ReplicaEvent(dep, f"r{i}", "bench-host", ReplicaState.READY, time.time(), endpoint=ep)
            await kv.put(key, encode_message(ev))
            t_answer = await asyncio.wait_for(task, 10)
            out.append((t_answer - t_ready) * 1e3)
            await kv.delete(key)
            await asyncio.sleep(0.1)  # the gateway has taken the replica out again
    return out


# --- the run -----------------------------------------------------------------------------------
def _pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


@dataclass
class Procs:
    """nats-server, the replica and the gateway, each its own process; stopped gateway first."""

    work: Path
    nats_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(
            os.environ,
            SNAPSCALE_NATS_URL=f"nats://127.0.0.1:{self.nats_port}",
            SNAPSCALE_NAMESPACE=NAMESPACE,
            SNAPSCALE_GATEWAY_ID="bench-gw",
            SNAPSCALE_LOG_LEVEL="WARNING",
        )
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        return env

    def start(self, gateway_cpu: int | None, load_cpu: int | None) -> subprocess.Popen[bytes]:
        nats = [find_exe("nats-server"), "-a", "127.0.0.1", "-p", str(self.nats_port), "-js"]
        self._spawn([*_pin(load_cpu), *nats, "-sd", str(self.work / "js")], quiet=True)
        wait_port(self.nats_port)
        py = sys.executable
        self._spawn([*_pin(load_cpu), py, "-m", "bench.gateway", "--replica", str(self.replica_port)])
        wait_port(self.replica_port)
        listen = f"127.0.0.1:{self.gateway_port}"
        gw = self._spawn([*_pin(gateway_cpu), py, "-m", "snapscale", "gateway", "--listen", listen])
        wait_port(self.gateway_port, 30)
        return gw

    def _spawn(self, argv: list[str], *, quiet: bool = False) -> subprocess.Popen[bytes]:
        out = subprocess.DEVNULL if quiet else None
        p = subprocess.Popen(argv, env=self.env(), cwd=REPO, stdout=out, stderr=out)
        self.running.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.running):  # the gateway first, the nats-server last
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)


async def measure(args: argparse.Namespace, procs: Procs, gw_pid: int) -> dict[str, Any]:
    b = await bus.open_bus(Settings.from_env(procs.env()), "bench-gateway")
    try:
        spec = DeploymentSpec(name="bench", command=["serve"])
        await b.kv[Bucket.DEPLOYMENTS].put("bench", spec.to_json())
        ep = f"127.0.0.1:{procs.replica_port}"
        ready = ReplicaEvent("bench", "r1", "bench-host", ReplicaState.READY, time.time(), endpoint=ep)
        await b.kv[Bucket.REPLICAS].put("bench.r1", encode_message(ready))
        await asyncio.sleep(0.5)  # the gateway has the record
        targets = {"direct": (procs.replica_port, "/x"), "gateway": (procs.gateway_port, "/bench/x")}
        for name, (port, path) in targets.items():  # warm both paths up (connections, code)
            await open_loop("127.0.0.1", port, path, 500, 1.0, Phase(name, 500, 1.0))
        phases: list[Phase] = []
        for rnd in range(args.rounds):
            for rate in args.rates:
                for name in ["direct", "gateway"] if rnd % 2 == 0 else ["gateway", "direct"]:
                    port, path = targets[name]
                    ph = Phase(name, rate, args.seconds)
                    c0, w0 = cpu_s(gw_pid), time.perf_counter()
                    await open_loop("127.0.0.1", port, path, rate, args.seconds, ph)
                    ph.gateway_cpu_s, ph.wall_s = cpu_s(gw_pid) - c0, time.perf_counter() - w0
                    phases.append(ph)
                    print(
                        f"round {rnd + 1} {name:7s} {rate:6.0f}/s: n={len(ph.latencies_ms)} err={ph.errors} "
                        f"p50 {ph.pct(0.5):.3f} ms p99 {ph.pct(0.99):.3f} ms, gateway CPU "
                        f"{100 * ph.gateway_cpu_s / ph.wall_s:.0f}% of a core",
                        flush=True,
                    )
        held = await held_latencies(b, procs.gateway_port, ep, args.held)
    finally:
        logging.getLogger("snapscale.shared.bus.client").setLevel(logging.ERROR)  # closing is no warning
        await b.close()
    return summarise(args, phases, held)


def summarise(args: argparse.Namespace, phases: list[Phase], held: list[float]) -> dict[str, Any]:
    rows = []
    for rate in args.rates:
        by: dict[str, Phase] = {}
        for name in ("direct", "gateway"):
            merged = Phase(name, rate, 0.0)
            for ph in phases:
                if ph.target == name and ph.rate == rate:
                    merged.latencies_ms += ph.latencies_ms
                    merged.errors += ph.errors
                    merged.late_ms += ph.late_ms
                    merged.seconds += ph.seconds
                    merged.gateway_cpu_s += ph.gateway_cpu_s
                    merged.wall_s += ph.wall_s
            by[name] = merged
        d, g = by["direct"], by["gateway"]
        rows.append({
            "rate": rate,
            "requests": {"direct": len(d.latencies_ms), "gateway": len(g.latencies_ms)},
            "errors": {"direct": d.errors, "gateway": g.errors},
            "p50_ms": {"direct": d.pct(0.5), "gateway": g.pct(0.5)},
            "p90_ms": {"direct": d.pct(0.9), "gateway": g.pct(0.9)},
            "p99_ms": {"direct": d.pct(0.99), "gateway": g.pct(0.99)},
            "added_p90_ms": g.pct(0.9) - d.pct(0.9),
            "added_p50_ms": g.pct(0.5) - d.pct(0.5),
            "added_p99_ms": g.pct(0.99) - d.pct(0.99),
            "gateway_cpu_share": g.gateway_cpu_s / g.wall_s if g.wall_s else None,
            "gateway_cpu_us_per_request": 1e6 * g.gateway_cpu_s / max(1, len(g.latencies_ms)),
            "sender_late_p99_ms": sorted(g.late_ms)[int(0.99 * len(g.late_ms))] if g.late_ms else None,
        })  # fmt: skip
    return {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "rates": rows,
        "held_ms": {
            "n": len(held),
            "p50": statistics.median(held) if held else None,
            "max": max(held) if held else None,
            "all": [round(x, 3) for x in held],
        },
    }


def render(r: dict[str, Any]) -> str:
    out = [f"machine: {r['machine']}, Python {r['python']}, load average after {r['load_avg'][0]:.2f}"]
    out.append("| rate | direct p50 / p99 | gateway p50 / p99 | added p50 / p90 / p99 | gateway CPU | errs |")
    out.append("|---|---|---|---|---|---|")
    for row in r["rates"]:
        cpu = row["gateway_cpu_share"]
        out.append(
            f"| {row['rate']:.0f}/s | {row['p50_ms']['direct']:.3f} / {row['p99_ms']['direct']:.3f} ms "
            f"| {row['p50_ms']['gateway']:.3f} / {row['p99_ms']['gateway']:.3f} ms "
            f"| {row['added_p50_ms']:.3f} / {row['added_p90_ms']:.3f} / {row['added_p99_ms']:.3f} ms "
            f"| {100 * cpu:.0f}% of a core, {row['gateway_cpu_us_per_request']:.0f} us a request "
            f"| {row['errors']['direct']} / {row['errors']['gateway']} |"
        )
    h = r["held_ms"]
    out.append(f"held request, answer minus ready record ({h['n']} runs): p50 {h['p50']:.2f} ms, ")
    out[-1] += f"max {h['max']:.2f} ms"
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1000.0, 5000.0])
    p.add_argument("--rounds", type=int, default=3, help="direct and gateway phases per rate, alternating")
    p.add_argument("--held", type=int, default=20, help="held-request runs")
    p.add_argument("--gateway-cpu", type=int, help="pin the gateway to this core (default: not pinned)")
    p.add_argument("--load-cpu", type=int, help="pin the sender, replica and nats-server to this core")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--replica", type=int, help=argparse.SUPPRESS)  # internal: serve as the replica
    args = p.parse_args(argv)
    if args.replica:
        uvloop.run(_serve_replica(args.replica))
        return 0
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        procs = Procs(Path(tmp))
        try:
            gw = procs.start(args.gateway_cpu, args.load_cpu)
            result = uvloop.run(measure(args, procs, gw.pid))
        finally:
            procs.stop()
    print(render(result))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
