"""Fixtures on real servers: a JetStream nats-server, moto's S3 server, the CRIU wrapper.

Each test gets its own NATS namespace, S3 prefix and temp dirs. In CI (SNAPSCALE_REQUIRE_CRIU=1)
a test marked `criu` that would skip fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import rerun_report
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from spanfix import memory_spans

from snapscale.demo.procs import free_port, wait_port
from snapscale.shared import bus
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.core.settings import Settings, StoreSettings
from snapscale.shared.engine.criu import CriuBinary, find_criu

VENV_BIN = Path(sys.executable).parent
REQUIRE_CRIU = os.environ.get("SNAPSCALE_REQUIRE_CRIU") == "1"
# The tests' sample specs run as host processes: development mode for this process and every
# service it starts. The OCI sandbox's own tests name an image (tests/test_oci_sandbox.py).
os.environ.setdefault("SNAPSCALE_SANDBOX", "host")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_CRIU and report.skipped and item.get_closest_marker("criu") is not None:
        report.outcome = "failed"
        report.longrepr = f"CRIU test skipped in CI (SNAPSCALE_REQUIRE_CRIU=1): {report.longrepr}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rerun_report.first_failures(terminalreporter)


@dataclass(frozen=True)
class NatsServer:
    url: str
    port: int
    store_dir: Path
    proc: subprocess.Popen[bytes]


def nats_exe() -> Path:
    exe = VENV_BIN / "nats-server"
    if not exe.exists():
        found = shutil.which("nats-server")
        if not found:
            raise RuntimeError("nats-server not found: run `make setup`")
        exe = Path(found)
    return exe


def start_nats(tmp: Path, *, jetstream: bool = True) -> NatsServer:
    exe = nats_exe()
    port = free_port()
    store = tmp / "js"
    proc = subprocess.Popen(
        [str(exe), "-a", "127.0.0.1", "-p", str(port), *(["-js", "-sd", str(store)] if jetstream else [])],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "nats.log", "wb"),  # noqa: SIM115 - the server outlives this function
    )
    wait_port(port)
    return NatsServer(url=f"nats://127.0.0.1:{port}", port=port, store_dir=store, proc=proc)


@dataclass(frozen=True)
class NatsCluster:
    nodes: list[NatsServer]

    @property
    def url(self) -> str:
        """Every node, comma-separated, as SNAPSCALE_NATS_URL lists a cluster."""
        return ",".join(n.url for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            if n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes:
            try:
                n.proc.wait(10)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(5)


def start_nats_cluster(
    tmp: Path,
    size: int = 3,
    *,
    addr: str = "127.0.0.1",
    ports: list[tuple[int, int]] | None = None,
    prefix: list[str] | None = None,
) -> NatsCluster:
    """`size` JetStream servers routed into one cluster; `ports` (client, route) per node, free
    loopback ports by default; `prefix` runs each under a wrapper (e.g. nsenter into a netns)."""
    exe = nats_exe()
    ports = ports or [(free_port(), free_port()) for _ in range(size)]
    routes = ",".join(f"nats://{addr}:{r}" for _, r in ports)
    nodes = []
    for i, (port, route) in enumerate(ports):
        d = tmp / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        argv = [str(exe), "-a", addr, "-p", str(port), "-n", f"n{i}", "--cluster_name", "snapscale",
                "-cluster", f"nats://{addr}:{route}", "-routes", routes,
                "-js", "-sd", str(d / "js")]  # fmt: skip
        proc = subprocess.Popen(
            [*(prefix or []), *argv],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "nats.log", "wb"),  # noqa: SIM115 - the server outlives this function
        )
        nodes.append(NatsServer(url=f"nats://{addr}:{port}", port=port, store_dir=d / "js", proc=proc))
    return NatsCluster(nodes)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    srv = start_nats(tmp_path_factory.mktemp("nats"))
    yield srv
    srv.proc.terminate()
    srv.proc.wait(10)


@pytest.fixture(scope="session")
def no_jetstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server without JetStream: what an operator's verb meets on a misconfigured server."""
    srv = start_nats(tmp_path_factory.mktemp("nats-nojs"), jetstream=False)
    yield srv
    srv.proc.terminate()
    srv.proc.wait(10)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    bucket = "snapscale-test"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield S3Server(endpoint_url=endpoint, bucket=bucket)
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(nats_server: NatsServer, namespace: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own namespace, a local store, cache and state dirs."""
    return Settings(
        nats_url=nats_server.url,
        namespace=namespace,
        store=StoreSettings(url=f"file://{tmp_path}/store"),
        signing_key=b"test-signing-key",
        cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "state",
        host_id="host-a",
    )


@pytest.fixture
def s3_settings(settings: Settings, s3_server: S3Server, namespace: str) -> Settings:
    """Like `settings`, with the chunk store on moto's S3 server under a per-test prefix."""
    from dataclasses import replace

    store = StoreSettings(url=f"s3://{s3_server.bucket}/{namespace}", endpoint_url=s3_server.endpoint_url)
    return replace(settings, store=store)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables a snapscale subprocess reads `settings` back from (Settings.from_env)."""
    env = {
        "SNAPSCALE_NATS_URL": settings.nats_url,
        "SNAPSCALE_NAMESPACE": settings.namespace,
        "SNAPSCALE_STORE": settings.store.url,
        "SNAPSCALE_SIGNING_KEY": settings.signing_key.decode(),
        "SNAPSCALE_STATE_DIR": str(settings.state_dir),
        "SNAPSCALE_CACHE_DIR": str(settings.cache_dir),
        "SNAPSCALE_HOST_ID": settings.host_id,
    }
    if settings.store.endpoint_url:
        env["AWS_ENDPOINT_URL"] = settings.store.endpoint_url
    return env


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Every span the module's tests end (spanfix.memory_spans)."""
    return memory_spans()


@pytest.fixture
async def the_bus(settings: Settings) -> AsyncIterator[bus.Bus]:
    b = await bus.open_bus(settings, "test")
    yield b
    await b.close()


@pytest.fixture(scope="session")
def criu() -> CriuBinary:
    """The CRIU wrapper, checked with `criu check`; needs root."""
    if os.geteuid() != 0:
        pytest.skip("CRIU needs root")
    try:
        b = find_criu(os.environ.get("SNAPSCALE_CRIU"))
    except ConfigError as e:
        pytest.skip(str(e))
    chk = subprocess.run([b.path, "check"], capture_output=True, text=True, check=False)
    if "Looks good" not in chk.stdout + chk.stderr:
        pytest.skip(f"criu check fails here: {chk.stdout} {chk.stderr}")
    return b
