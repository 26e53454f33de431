"""Who may talk on the bus: a real nats-server started with compose/nats.conf itself.

A client without credentials is refused; the gateway publishes traffic and reads its buckets; a host
consumes its own commands and not another host's; the scaler commands any host. The real
restorer and scaler run under their roles' credentials (every JetStream and KV call they make is
allowed), and the credentials reach nats-py through Settings (bus/auth.py) as they do in a service.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats
import nkeys
import pytest
from conftest import VENV_BIN
from engine_helpers import kill_tagged
from nats.aio.client import Client as NATS
from nats.js import api
from restorer_harness import Harness, follow, running
from test_httpget import self_signed

from snapscale.demo.procs import free_port, wait_port
from snapscale.gateway.config import GatewayConfig
from snapscale.gateway.service import Gateway
from snapscale.scaler.config import ScalerConfig
from snapscale.scaler.service import Scaler
from snapscale.shared import bus
from snapscale.shared.bus.auth import connect_options
from snapscale.shared.bus.messages import ReplicaState, ScaleUpCommand, Tier, TrafficEvent
from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.bus.subjects import Bucket, Subjects, Verb
from snapscale.shared.core.settings import NatsAuth, Settings, StoreSettings
from snapscale.shared.engine.criu import CriuBinary

CONF = Path(__file__).resolve().parent.parent / "compose" / "nats.conf"
ROLES = ("gateway", "scaler", "gpu-host-1", "operator")
PASSWORDS = {role: f"{role}-{uuid.uuid4().hex[:8]}" for role in ROLES}
S = Subjects()  # the config names namespace "snapscale"'s subjects, streams and buckets


def password_var(role: str) -> str:
    return f"SNAPSCALE_NATS_{role.upper().replace('-', '_')}_PASSWORD"


@pytest.fixture(scope="module")
def authz_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("nats-authz")
    port = free_port()
    env = {**os.environ, **{password_var(r): pw for r, pw in PASSWORDS.items()}}
    proc = subprocess.Popen(
        [str(VENV_BIN / "nats-server"), "-c", str(CONF), "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "nats.log", "wb"),  # noqa: SIM115 - the server outlives this call
    )
    wait_port(port)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def auth(role: str, **kw: object) -> NatsAuth:
    return NatsAuth(user=role, password=PASSWORDS[role], inbox_prefix=f"_INBOX.{role}", **kw)  # type: ignore[arg-type]


def role_settings(url: str, role: str, tmp: Path, host: str = "gpu-host-1") -> Settings:
    return Settings(
        nats_url=url,
        nats_auth=auth(role),
        store=StoreSettings(url=f"file://{tmp}/store"),
        signing_key=b"test-signing-key",
        cache_dir=tmp / "cache",
        state_dir=tmp / "state",
        host_id=host,
    )


@dataclass
class Client:
    """A raw connection that keeps the server's errors (a permission violation is one)."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    def denied(self, subject: str) -> bool:
        # nats-py lower-cases the server's message
        said = f'permissions violation for publish to "{subject.lower()}"'
        return any(said in e.lower() for e in self.errors)


async def client(url: str, a: NatsAuth) -> Client:
    c = Client(nc=NATS())

    async def on_error(e: Exception) -> None:
        c.errors.append(str(e))

    await c.nc.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=5, **connect_options(a))
    return c


async def eventually(ok: object, timeout_s: float = 5.0) -> bool:
    assert callable(ok)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return True
        await asyncio.sleep(0.05)
    return False


def scale_up(host_replica: str) -> ScaleUpCommand:
    return ScaleUpCommand(
        id=f"c-{uuid.uuid4().hex[:8]}", deployment="llm", replica=host_replica, issued_at=time.time(),
        allow_tiers=list(Tier),
    )  # fmt: skip


@pytest.fixture
async def scaler_bus(authz_url: str, tmp_path: Path) -> AsyncIterator[bus.Bus]:
    b = await bus.open_bus(role_settings(authz_url, "scaler", tmp_path), "scaler")  # creates the topology
    yield b
    await b.close()


async def test_no_or_wrong_credentials_are_refused(authz_url: str) -> None:
    for a in (NatsAuth(), NatsAuth(user="scaler", password="guess"), NatsAuth(user="nobody", password="x")):
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
            await nats.connect(authz_url, allow_reconnect=False, connect_timeout=5, **connect_options(a))


async def test_gateway_publishes_traffic_reads_its_buckets_and_nothing_else(
    authz_url: str, scaler_bus: bus.Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[TrafficEvent] = []

    async def on_traffic(ev: TrafficEvent, _m: object) -> None:
        got.append(ev)

    sub, _ = await bus.subscribe_core(scaler_bus, S.traffic_all(), TrafficEvent, on_traffic)
    await scaler_bus.nc.flush()
    gw = await client(authz_url, auth("gateway"))
    try:
        ev = TrafficEvent(deployment="llm", ts=time.time(), arrivals=1, concurrency=1.0)
        await gw.nc.publish(S.traffic("llm"), bus.encode_message(ev))
        assert await eventually(lambda: len(got) == 1), "the scaler got the gateway's traffic"

        before = (await scaler_bus.js.stream_info(S.cmd_stream)).state.messages
        cmd_subject = S.cmd(Verb.SCALE_UP, "gpu-host-1")
        await gw.nc.publish(cmd_subject, bus.encode_message(scale_up("r-gw")))
        assert await eventually(lambda: gw.denied(cmd_subject)), gw.errors
        # it reads replica records, it never writes one
        record = f"$KV.{S.bucket(Bucket.REPLICAS)}.llm.r-gw"
        await gw.nc.publish(record, b"{}")
        assert await eventually(lambda: gw.denied(record)), gw.errors
        await gw.nc.subscribe(S.cmd_all())
        sub_denied = f'subscription to "{S.cmd_all()}"'
        assert await eventually(lambda: any(sub_denied in e for e in gw.errors)), gw.errors
        assert (await scaler_bus.js.stream_info(S.cmd_stream)).state.messages == before
    finally:
        await sub.unsubscribe()  # type: ignore[attr-defined]
        await gw.nc.close()

    # the real gateway under its role: every call it makes (its watches, its replica events) allowed
    operator = await bus.open_bus(role_settings(authz_url, "operator", tmp_path), "operator")
    gateway = Gateway(
        replace(role_settings(authz_url, "gateway", tmp_path), host_id="gw"),
        GatewayConfig(gateway_id="gw-auth", listen_host="127.0.0.1", listen_port=0),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await asyncio.wait([task, asyncio.create_task(gateway.ready.wait())], timeout=15,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if task.done():
            task.result()
        name = f"auth{uuid.uuid4().hex[:6]}"
        await operator.kv[Bucket.DEPLOYMENTS].put(name, DeploymentSpec(name=name, command=["x"]).to_json())
        assert await eventually(lambda: name in gateway.pools and gateway.pools[name].deployed)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await operator.close()
    refused = [r.getMessage() for r in caplog.records if "permissions violation" in r.getMessage().lower()]
    assert refused == [], refused


async def test_a_host_consumes_its_own_commands_only(
    authz_url: str, scaler_bus: bus.Bus, tmp_path: Path
) -> None:
    mine, theirs = scale_up("r-mine"), scale_up("r-theirs")
    await bus.publish(scaler_bus, S.cmd(Verb.SCALE_UP, "gpu-host-1"), mine, msg_id=mine.id)
    await bus.publish(scaler_bus, S.cmd(Verb.SCALE_UP, "gpu-host-2"), theirs, msg_id=theirs.id)

    host = await bus.open_bus(role_settings(authz_url, "gpu-host-1", tmp_path), "restorer-gpu-host-1")
    try:
        # the restorer's own durable on its own subject, as the service creates it
        sub = await host.js.pull_subscribe(
            S.cmd(Verb.SCALE_UP, "gpu-host-1"),
            durable=S.durable("restorer", Verb.SCALE_UP, "gpu-host-1"),
            config=api.ConsumerConfig(ack_wait=10, max_deliver=5),
        )
        (m,) = await sub.fetch(1, timeout=5)
        assert bus.decode_message(m.data, ScaleUpCommand).id == mine.id
        await m.ack_sync()
        await host.kv[Bucket.HOSTS].put("gpu-host-1", b"{}")  # its heartbeat
    finally:
        await host.close()

    raw = await client(authz_url, auth("gpu-host-1"))
    js = raw.nc.jetstream()
    other = S.cmd(Verb.SCALE_UP, "gpu-host-2")
    theirs_durable = S.durable("restorer", Verb.SCALE_UP, "gpu-host-2")
    hosts_key = f"$KV.{S.bucket(Bucket.HOSTS)}.gpu-host-2"
    spy = api.ConsumerConfig(name="spy", filter_subject=other)
    # each denied request is answered by nobody (a timeout) and reported by the server
    denied: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        # another host's durable, by name
        (f"$JS.API.CONSUMER.INFO.{S.cmd_stream}.{theirs_durable}",
         lambda: js.pull_subscribe(other, durable=theirs_durable, stream=S.cmd_stream)),
        # a consumer of its own on another host's commands, or on all of them
        (f"$JS.API.CONSUMER.CREATE.{S.cmd_stream}.spy.{other}",
         lambda: js.add_consumer(S.cmd_stream, spy, timeout=1)),
        (f"$JS.API.CONSUMER.CREATE.{S.cmd_stream}",
         lambda: js.add_consumer(S.cmd_stream, api.ConsumerConfig(), timeout=1)),
        # commanding another host; writing another host's heartbeat
        (other, lambda: js.publish(other, b"{}", timeout=1)),
        (hosts_key, lambda: js.publish(hosts_key, b"{}", timeout=1)),
    ]  # fmt: skip
    try:
        for subject, request in denied:
            with pytest.raises(nats.errors.TimeoutError):
                await request()
            assert await eventually(lambda s=subject: raw.denied(s)), (subject, raw.errors)
    finally:
        await raw.nc.close()
    # gpu-host-2's command is still there, for gpu-host-2
    info = await scaler_bus.js.stream_info(S.cmd_stream, subjects_filter=other)
    assert info.state.subjects == {other: 1}


@pytest.mark.criu
async def test_the_restorer_and_scaler_run_under_their_roles(
    authz_url: str, criu: CriuBinary, tmp_path: Path
) -> None:
    """Every call the real services make is allowed: the restorer cold-boots a replica on its
    host's command and reports it ready; the scaler starts (watches, lease, events consumer)."""
    operator = await bus.open_bus(role_settings(authz_url, "operator", tmp_path), "operator")
    tag = f"rauth-{uuid.uuid4().hex[:10]}"
    h = Harness(role_settings(authz_url, "gpu-host-1", tmp_path), operator, criu, tag, tmp_path)
    try:
        async for _ in follow(h):
            spec = await h.deploy(h.spec(f"auth{uuid.uuid4().hex[:6]}"))
            async with running(h.settings, criu):
                await h.restore(spec.name, "r1")
                ev = await h.wait("r1")
                assert ev.state is ReplicaState.READY and ev.tier is Tier.COLD, ev

            scaler = Scaler(replace(h.settings, nats_auth=auth("scaler")), ScalerConfig(tick_s=0.2))
            stop = asyncio.Event()
            task = asyncio.create_task(scaler.run(stop))
            await asyncio.wait([task, asyncio.create_task(scaler.ready.wait())], timeout=15,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if task.done():
                task.result()
            assert scaler.ready.is_set()
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        kill_tagged(tag)
        await operator.close()


def start_server(tmp: Path, conf: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    (tmp / "server.conf").write_text(conf)
    proc = subprocess.Popen(
        [str(VENV_BIN / "nats-server"), "-c", str(tmp / "server.conf"), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "server.log", "wb"),  # noqa: SIM115 - the server outlives this call
    )
    wait_port(port)
    return f"nats://127.0.0.1:{port}", proc


def nkey_user(tmp: Path) -> tuple[str, Path]:
    """A user nkey: its public key (for the server) and its seed file (for the client)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (tmp / "user.nk").write_bytes(seed + b"\n")
    return nkeys.from_seed(seed).public_key.decode(), tmp / "user.nk"


@pytest.mark.parametrize("kind", ["token", "nkey", "tls"])
async def test_each_credential_from_the_environment_reaches_a_real_server(kind: str, tmp_path: Path) -> None:
    """SNAPSCALE_NATS_TOKEN / _NKEY / _CA (+ user and password) through Settings.from_env and the
    services' own bus.connect to a server that demands them; the same without them is refused."""
    env: dict[str, str] = {}
    if kind == "token":
        conf = "authorization { token: s3cret-token }"
        env["SNAPSCALE_NATS_TOKEN"] = "s3cret-token"
    elif kind == "nkey":
        public, seed_file = nkey_user(tmp_path)
        conf = f"authorization {{ users: [ {{ nkey: {public} }} ] }}"
        env["SNAPSCALE_NATS_NKEY"] = str(seed_file)
    else:
        cert, key = self_signed(tmp_path)
        conf = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\nauthorization {{ user: u, password: p }}'
        env.update(SNAPSCALE_NATS_CA=str(cert), SNAPSCALE_NATS_USER="u", SNAPSCALE_NATS_PASSWORD="p")
    url, proc = start_server(tmp_path, conf)
    try:
        s = Settings.from_env({"SNAPSCALE_NATS_URL": url, **env})
        nc = await bus.connect(s, "auth-test")
        try:
            assert nc.is_connected
            await nc.flush(timeout=5)
        finally:
            await nc.close()
        # the same server without the credential: refused (TLS without the CA: not trusted)
        bare = connect_options(Settings.from_env({"SNAPSCALE_NATS_URL": url}).nats_auth)
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(url, allow_reconnect=False, connect_timeout=5, **bare)
    finally:
        proc.terminate()
        proc.wait(10)
