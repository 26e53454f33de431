"""Several GPU hosts on one machine: two host stand-ins, each a network namespace of its own with
its restorer, freezer, cache and state dir, advertising forwarded ports; a three-node nats-server
cluster with R3 streams; `snapscale gateway` and the client in a third namespace. All addresses are
loopback or 10.78.x.y on links between namespaces this test makes (nothing is added to the
machine's own namespace).

    gateway + client (ns c, 10.78.3.2) ──┐
    host a (ns a, 10.78.1.2) ────────────┼── fabric (ns fab: routes between them; NATS n0-n2 and
    host b (ns b, 10.78.2.2) ────────────┘    the scaler on 10.78.0.1; the test's body, on a thread
                                              that entered it)

Every request goes through the gateway. One to the deployment at zero is held and answered by a
restore on the host whose cache holds the checkpoint (a); with a's restorer killed and its
namespace removed, the next one is answered from b; with one NATS node killed, requests keep being
answered, and the scale-up their load asks for meanwhile is not lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import NatsCluster, start_nats_cluster
from engine_helpers import ROOT
from nsutil import NETNS_DIR, _setns, add_netns, del_netns, run_in, sh
from restorer_harness import Harness
from test_scaler_service import quick

from snapscale.demo.procs import ProcessSet, log_tail, reap_sandboxes
from snapscale.shared import bus
from snapscale.shared.bus.messages import (
    HostHeartbeat,
    PrefetchCommand,
    ReplicaEvent,
    ReplicaState,
    Tier,
    decode_message,
)
from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.bus.subjects import Bucket, Verb
from snapscale.shared.core.settings import Settings
from snapscale.shared.engine.criu import CriuBinary

pytestmark = [pytest.mark.criu, pytest.mark.slow]

FAB_IP = "10.78.0.1"  # the fabric's own address, on its loopback: every spoke routes to it, and it
# outlives any spoke's link (NATS listens here)
SPOKES = {"a": 1, "b": 2, "c": 3}  # namespace -> its /24: 10.78.<n>.2, the fabric at 10.78.<n>.1
NATS_PORTS = [(4222, 6222), (4223, 6223), (4224, 6224)]  # inside the fabric namespace only
FORWARD_PORTS = "31000-31099"


@dataclass(frozen=True)
class Net:
    fab: str
    ns: dict[str, str]  # "a" | "b" | "c" -> namespace name

    def addr(self, spoke: str) -> str:
        return f"10.78.{SPOKES[spoke]}.2"


@contextlib.contextmanager
def network() -> Iterator[Net]:
    """The fabric and its spokes; every namespace removed at the end, whatever happened."""
    tag = uuid.uuid4().hex[:6]
    net = Net(fab=f"mh{tag}-fab", ns={k: f"mh{tag}-{k}" for k in SPOKES})
    made: list[str] = []
    try:
        for name in (net.fab, *net.ns.values()):
            add_netns(name)
            made.append(name)
        sh("ip", "netns", "exec", net.fab, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", net.fab, "addr", "add", f"{FAB_IP}/32", "dev", "lo")
        for spoke, n in SPOKES.items():
            ns, link = net.ns[spoke], f"v{spoke}"
            sh("ip", "-n", net.fab, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", net.fab, "addr", "add", f"10.78.{n}.1/24", "dev", link)
            sh("ip", "-n", net.fab, "link", "set", link, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.78.{n}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.78.{n}.1")
        yield net
    finally:
        for name in made:
            del_netns(name)


def get_from(ns: str, url: str, timeout_s: float = 10.0) -> Awaitable[bytes]:
    """GET `url` from inside netns `ns`: on a thread of its own that enters it and then ends."""
    fut: concurrent.futures.Future[bytes] = concurrent.futures.Future()

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                _setns(fd)  # this thread only, and it ends after the request
            finally:
                os.close(fd)
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                fut.set_result(r.read())
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return asyncio.wrap_future(fut)


def tuned(d: DeploymentSpec) -> DeploymentSpec:
    scaling = quick(
        d.scaling,
        max_replicas=2,
        scale_to_zero_after_s=600.0,  # never within the test: every replica seen stays up
        concurrency_limit=1,  # the sample serves one request at a time: the gateway queues the rest
    )
    return replace(d, scaling=scaling, freeze=replace(d.freeze, after_ready=False))


async def replicas_of(b: bus.Bus, deployment: str) -> list[ReplicaEvent]:
    """The deployment's replicas as KV `replicas` has them (R3: the truth whichever node answers)."""
    kv = b.kv[Bucket.REPLICAS]
    try:
        keys = await kv.keys()
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        return []
    out = []
    for k in keys:
        if k.startswith(f"{deployment}."):
            got = await bus.kv_get(kv, k)
            if got is not None:
                out.append(decode_message(got[0], ReplicaEvent))
    return out


async def until(
    what: str, cond: Callable[[], Awaitable[bool]], procs: ProcessSet, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):  # a NATS node may be electing a leader
            if await cond():
                return
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {m.name}\n{log_tail(m.log_path, 30)}" for m in procs.procs)
            raise AssertionError(f"not within {timeout_s}s: {what}\n{logs}")
        await asyncio.sleep(0.2)


def host_env(settings: Settings, criu: CriuBinary, tmp: Path, host: str, advertise: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSCALE_")}
    env.update(
        SNAPSCALE_NATS_URL=settings.nats_url,
        SNAPSCALE_JS_REPLICAS="3",
        SNAPSCALE_NAMESPACE=settings.namespace,
        SNAPSCALE_STORE=settings.store.url,
        SNAPSCALE_SIGNING_KEY=settings.signing_key.decode(),
        SNAPSCALE_CACHE_DIR=str(tmp / host / "cache"),
        SNAPSCALE_STATE_DIR=str(tmp / host / "state"),
        SNAPSCALE_HOST_ID=host,
        SNAPSCALE_CRIU=criu.path,
        SNAPSCALE_HEARTBEAT_S="0.5",
        SNAPSCALE_ADVERTISE_ADDR=advertise,
        SNAPSCALE_FORWARD_PORTS=FORWARD_PORTS,
        SNAPSCALE_SANDBOX=os.environ.get("SNAPSCALE_SANDBOX", "oci"),  # dev mode: conftest
    )
    return env


def test_requests_are_answered_across_hosts_through_a_host_loss_and_a_nats_node_loss(
    criu: CriuBinary, tmp_path: Path, namespace: str
) -> None:
    procs = ProcessSet(tmp_path / "logs")
    cluster: NatsCluster | None = None
    with network() as net:
        try:
            in_fab = ["nsenter", f"--net={NETNS_DIR / net.fab}"]
            cluster = start_nats_cluster(tmp_path / "nats", addr=FAB_IP, ports=NATS_PORTS, prefix=in_fab)
            c = cluster
            run_in(net.fab, lambda: _scenario(net, c, procs, criu, tmp_path, namespace))
        finally:
            procs.stop_all()
            if cluster is not None:
                cluster.stop()
            reap_sandboxes(tmp_path)


async def _scenario(
    net: Net, cluster: NatsCluster, procs: ProcessSet, criu: CriuBinary, tmp: Path, namespace: str
) -> None:
    settings = Settings(
        nats_url=cluster.url,
        namespace=namespace,
        store=replace(Settings().store, url=f"file://{tmp / 'store'}"),
        signing_key=b"test-signing-key",
        cache_dir=tmp / "test" / "cache",
        state_dir=tmp / "test" / "state",
        host_id="test",
        js_replicas=3,
    )
    deadline = time.monotonic() + 30
    while True:  # a new cluster takes a few seconds to elect its meta leader
        try:
            b = await bus.open_bus(settings, "multihost-test")
            break
        except Exception:
            assert time.monotonic() < deadline, "the NATS cluster did not take requests in 30s"
            await asyncio.sleep(0.5)
    marks = [("start", time.monotonic())]
    try:
        assert (await b.js.stream_info(b.subjects.cmd_stream)).config.num_replicas == 3
        h = Harness(settings, b, criu, tag=namespace, tmp=tmp / "src")
        spec = await h.deploy(tuned(h.spec("mh")))
        frozen = await h.make_checkpoint(spec)
        marks.append(("checkpoint made", time.monotonic()))
        ckpt = frozen.entry.checkpoint_id

        me = [sys.executable, "-m", "snapscale"]
        pre = {k: ["nsenter", f"--net={NETNS_DIR / net.ns[k]}"] for k in ("a", "b")}
        for host in ("a", "b"):
            env = host_env(settings, criu, tmp, host, net.addr(host))
            procs.start(f"restorer-{host}", [*pre[host], *me, "restorer", "--host", host], env, cwd=ROOT)
            procs.start(f"freezer-{host}", [*pre[host], *me, "freezer", "--host", host], env, cwd=ROOT)

        async def heartbeat(host: str) -> bool:
            return await bus.kv_get(b.kv[Bucket.HOSTS], host) is not None

        for host in ("a", "b"):
            await until(f"host {host} reporting", lambda host=host: heartbeat(host), procs)  # type: ignore[misc]
        # the checkpoint in a's cache only: placement prefers the host that holds it
        prefetch = PrefetchCommand(f"p-{uuid.uuid4().hex[:8]}", spec.name, issued_at=time.time())
        await bus.publish(b, b.subjects.cmd(Verb.PREFETCH, "a"), prefetch, msg_id=prefetch.id)

        async def cached_on_a() -> bool:
            got = await bus.kv_get(b.kv[Bucket.HOSTS], "a")
            return got is not None and ckpt in decode_message(got[0], HostHeartbeat).cached_checkpoints

        await until("the checkpoint cached on host a", cached_on_a, procs)
        marks.append(("hosts up, a cached", time.monotonic()))
        procs.start("scaler", [*me, "scaler", "--tick-s", "0.2", "--lease-s", "1"],
                    dict(host_env(settings, criu, tmp, "scaler", FAB_IP), SNAPSCALE_HOST_ID="scaler"),
                    cwd=ROOT)  # fmt: skip

        # ---- the request path: `snapscale gateway` in the client's namespace, on its address
        gw_addr = f"{net.addr('c')}:8080"
        gw_env = dict(host_env(settings, criu, tmp, "gateway", net.addr("c")), SNAPSCALE_HOST_ID="gateway")
        procs.start("gateway", ["nsenter", f"--net={NETNS_DIR / net.ns['c']}", *me, "gateway",
                                "--listen", gw_addr, "--id", "gw-c"], gw_env, cwd=ROOT)  # fmt: skip

        async def gateway_up() -> bool:
            try:
                await get_from(net.ns["c"], f"http://{gw_addr}/", timeout_s=2.0)
            except urllib.error.HTTPError as e:
                return e.code == 404  # it answers: no deployment named in "/"
            return False

        await until("the gateway listening", gateway_up, procs)

        async def through_gateway(timeout_s: float = 120.0) -> bytes:
            return await get_from(net.ns["c"], f"http://{gw_addr}/{spec.name}/generate", timeout_s)

        async def ready_on(host: str, n: int = 1) -> list[ReplicaEvent]:
            got: list[ReplicaEvent] = []

            async def check() -> bool:
                now = await replicas_of(b, spec.name)
                got[:] = [r for r in now if r.state is ReplicaState.READY and r.host == host]
                return len(got) >= n

            await until(f"{n} ready replica(s) on host {host}", check, procs, timeout_s=90)
            return got

        async def request(ev: ReplicaEvent, timeout_s: float = 10.0) -> bytes:
            return await get_from(net.ns["c"], f"http://{ev.endpoint}/generate", timeout_s)

        # 1. at zero: held by the gateway, restored on a from its cache, answered
        asking = asyncio.create_task(through_gateway())
        [first] = await ready_on("a")
        assert first.tier is Tier.CACHE, first.reason
        assert first.endpoint.startswith(f"{net.addr('a')}:") and first.local_endpoint.startswith("10.213.")
        assert await asking == frozen.answer
        assert await request(first) == frozen.answer  # its advertised endpoint, from another namespace
        marks.append(("answered from a", time.monotonic()))

        # 2. host a dies (restorer killed, its namespace removed): the next request is answered from b
        for name in ("restorer-a", "freezer-a"):
            m = next(p for p in procs.procs if p.name == name)
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)
        del_netns(net.ns["a"])
        with pytest.raises((urllib.error.URLError, TimeoutError)):
            await request(first, timeout_s=3.0)  # its endpoint is gone with its host
        # the gateway's try on a fails to connect: the request waits for the replica placed on b
        asking = asyncio.create_task(through_gateway())
        [second] = await ready_on("b")
        assert second.tier is Tier.STORE, second.reason  # b's cache was empty
        assert second.endpoint.startswith(f"{net.addr('b')}:")
        assert await asking == frozen.answer
        marks.append(("a lost, answered from b", time.monotonic()))

        # 3. one NATS node down (the command stream's leader): requests are answered, and the
        # scale-up that more traffic asks for meanwhile reaches b and ends ready
        info = (await b.js.stream_info(b.subjects.cmd_stream)).cluster
        leader = info.leader if info is not None else None
        victim = cluster.nodes[int((leader or "n1")[1:])]
        victim.proc.kill()
        victim.proc.wait(10)
        assert await through_gateway() == frozen.answer
        # six clients at once against one replica that serves one at a time: the gateway holds
        # the others and reports them, and the scaler places a second replica
        loaded = asyncio.Event()

        async def client() -> None:
            while not loaded.is_set():
                assert await through_gateway() == frozen.answer

        load = [asyncio.create_task(client()) for _ in range(6)]
        try:
            both = await ready_on("b", 2)
        finally:
            loaded.set()
            await asyncio.gather(*load)
        for ev in both:
            assert await request(ev) == frozen.answer
        # every scale-up that reached a host ended ready: none failed on b, none left half-way
        now = await replicas_of(b, spec.name)
        astray = [r for r in now if r.host != "a" and r.state is not ReplicaState.READY]
        assert not astray, [(r.replica, r.state.value, r.reason) for r in astray]
        marks.append(("NATS node lost, 2nd replica ready", time.monotonic()))
        steps = ", ".join(f"{n} +{t - p:.1f}s" for (_, p), (n, t) in itertools.pairwise(marks))
        print(f"multihost: {steps}")
    finally:
        await b.close()
