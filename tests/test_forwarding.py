"""Host ports forwarded to sandboxes by nftables DNAT (engine forward.py, restorer forwarding.py):
the pure parts, then the kernel's, in a network namespace of the test's own (never the host's)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from nsutil import add_netns, del_netns, run_in, sh

from snapscale.restorer.config import RestorerConfig
from snapscale.restorer.forwarding import Forwards
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import Forward, Sandbox, free_host_port, netns, port_hint, probe
from snapscale.shared.engine import forward as fwd_mod
from snapscale.shared.engine.errors import EngineError


def test_ruleset_makes_the_map_and_both_dnat_hooks_and_keeps_the_elements() -> None:
    r = fwd_mod.ruleset("snapscale")
    assert "add map ip snapscale ports { type inet_service : ipv4_addr . inet_service; }" in r
    for chain in ("prerouting", "output"):
        assert f"add rule ip snapscale {chain} fib daddr type local dnat ip to tcp dport map @ports" in r
    assert "flush map" not in r and "delete" not in r  # a restart keeps what is forwarded


def test_a_listing_reads_back_as_forwards_and_garbage_is_an_error() -> None:
    data = (
        b'{"nftables": [{"metainfo": {}}, {"map": {"name": "ports", "elem": '
        b'[[30001, {"concat": ["10.213.0.6", 8000]}], [30002, {"concat": ["10.213.0.10", 9000]}]]}}]}'
    )
    want = [Forward(30001, "10.213.0.6", 8000), Forward(30002, "10.213.0.10", 9000)]
    assert fwd_mod.parse_listing(data) == want
    with pytest.raises(EngineError, match="unreadable nft map listing"):
        fwd_mod.parse_listing(b'{"nftables": [{"map": {"elem": [[1, {"concat": ["nope", 2]}]]}}]}')


def test_ports_come_from_the_range_past_the_used_ones_wrapping() -> None:
    assert free_host_port(set(), 30000, 30002, 30001) == 30001
    assert free_host_port({30001, 30002}, 30000, 30002, 30001) == 30000
    with pytest.raises(EngineError, match="all 3 forwarded ports 30000-30002 are in use"):
        free_host_port({30000, 30001, 30002}, 30000, 30002, 30000)
    assert all(30000 <= port_hint(f"r{i}", 30000, 30009) <= 30009 for i in range(50))
    assert fwd_mod.forward_table_name("t-1a") == "t_1a"
    with pytest.raises(EngineError, match="no nftables table name"):
        fwd_mod.forward_table_name("1a")


def test_sandbox_records_keep_their_host_port() -> None:
    sb = Sandbox("r1", "d", 10, "snapscale-3", "10.213.0.14:8000", host_port=30007)
    assert Sandbox.from_dict(sb.to_dict()).host_port == 30007
    old = {k: v for k, v in sb.to_dict().items() if k != "host_port"}  # a record from before
    assert Sandbox.from_dict(old).host_port is None


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SNAPSCALE_ADVERTISE_ADDR": "10.0.0.5:80"}, "SNAPSCALE_ADVERTISE_ADDR='10.0.0.5:80': want this"),
        ({"SNAPSCALE_ADVERTISE_ADDR": "fd00::1"}, "IPv4 only"),
        ({"SNAPSCALE_FORWARD_PORTS": "3000-x"}, "SNAPSCALE_FORWARD_PORTS='3000-x' is not a valid value"),
        ({"SNAPSCALE_FORWARD_PORTS": "40000-30000"}, "SNAPSCALE_FORWARD_PORTS=40000-30000"),
        ({"SNAPSCALE_FORWARD_PORTS": "0-10"}, "1 <= lo <= hi <= 65535"),
    ],
)
def test_bad_forwarding_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("?", r"\?")):
        RestorerConfig.from_env("h", env)


def test_forwarding_settings_are_read() -> None:
    env = {"SNAPSCALE_ADVERTISE_ADDR": "gpu-7.example", "SNAPSCALE_FORWARD_PORTS": "31000-31099"}
    c = RestorerConfig.from_env("h", env)
    assert (c.advertise_addr, c.forward_ports) == ("gpu-7.example", (31000, 31099))
    assert RestorerConfig.from_env("h", {}).advertise_addr is None


# --- in the kernel -----------------------------------------------------------------------------
ADDR = "10.77.0.1"  # the stand-in host's address, on a link inside the test's own namespace


@pytest.fixture
def host_ns() -> Iterator[str]:
    if shutil.which("nft") is None or shutil.which("ip") is None:
        pytest.skip("needs nft and ip (scripts/setup installs nftables)")
    name = f"ssfwd-{uuid.uuid4().hex[:6]}"
    add_netns(name)
    try:
        # no dummy link in every kernel: a veth pair with both ends here stands in
        sh("ip", "-n", name, "link", "add", "adv0", "type", "veth", "peer", "name", "adv1")
        sh("ip", "-n", name, "addr", "add", f"{ADDR}/24", "dev", "adv0")
        for link in ("adv0", "adv1"):
            sh("ip", "-n", name, "link", "set", link, "up")
        yield name
    finally:
        del_netns(name)


async def _answers(endpoint: str) -> bool:
    with contextlib.suppress(OSError, TimeoutError, ValueError):
        status, _ = await probe.http_request("GET", endpoint, "/", timeout_s=2)
        return status == 200
    return False


@pytest.mark.criu  # root and nftables, as the restorer needs them; CI must not skip it
def test_a_forwarded_port_reaches_the_sandbox_survives_a_restart_and_goes_on_close(
    host_ns: str, namespace: str
) -> None:
    run_in(host_ns, lambda: _forwarded_port(namespace))


async def _forwarded_port(namespace: str) -> None:
    cfg = RestorerConfig(host="h", advertise_addr=ADDR, forward_ports=(31000, 31009))
    server: subprocess.Popen[bytes] | None = None
    ns: netns.NetNs | None = None
    try:
        fw = Forwards(cfg, namespace)
        assert await fw.reconcile([]) == []
        ns = await netns.create(f"fwd-{namespace}")  # its veth lands in the stand-in host
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, killed below
            ["ip", "netns", "exec", ns.name, sys.executable, "-m", "http.server", "8000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        sb = Sandbox("r1", "d", server.pid, ns.name, f"{ns.sandbox_ip}:8000")
        for _ in range(100):
            if await _answers(sb.endpoint):
                break
            await asyncio.sleep(0.1)
        sb = await fw.open(sb)
        assert sb.host_port is not None and 31000 <= sb.host_port <= 31009
        assert fw.endpoint(sb) == f"{ADDR}:{sb.host_port}"
        assert await _answers(fw.endpoint(sb)), "the advertised endpoint does not answer"

        # a restorer starting again: the live sandbox keeps its port, a stray forward goes
        stray = 31000 if sb.host_port != 31000 else 31001
        await fw.kernel.add(Forward(stray, "10.213.255.254", 80))
        again = Forwards(cfg, namespace)
        assert await again.reconcile([sb]) == [sb]
        assert {f.port for f in await again.kernel.listed()} == {sb.host_port}
        assert await _answers(again.endpoint(sb))

        # the kernel lost it (a reboot): forwarded again on start, on some port of the range
        await again.kernel.remove(sb.host_port)
        third = Forwards(cfg, namespace)
        [sb3] = await third.reconcile([sb])
        assert sb3.host_port is not None and await _answers(third.endpoint(sb3))

        await third.close("r1")
        assert await third.kernel.listed() == []
        assert not await _answers(third.endpoint(sb3)), "a closed port still reaches the sandbox"
    finally:
        if server is not None:
            server.kill()
            server.wait(5)
        if ns is not None:
            await netns.delete_netns(ns.name)


class _Kernel:
    """Stands in for the nft table: what was added and removed."""

    def __init__(self) -> None:
        self.forwards: dict[int, Forward] = {}

    async def add(self, fwd: Forward) -> None:
        self.forwards[fwd.port] = fwd

    async def remove(self, port: int) -> None:
        self.forwards.pop(port, None)


async def test_a_replica_resumed_under_a_new_id_gives_its_port_back_under_that_id() -> None:
    fw = Forwards(RestorerConfig(host="h", advertise_addr="10.0.0.5", forward_ports=(31000, 31009)), "t")
    kernel = _Kernel()
    fw.kernel = kernel  # type: ignore[assignment]
    old = await fw.open(Sandbox("r-old", "d", 10, "snapscale-3", "10.213.0.14:8000"))
    assert old.host_port is not None and set(kernel.forwards) == {old.host_port}
    resumed = replace(old, replica="r-new")  # as a resume of a suspended replica hands it over
    assert await fw.open(resumed) == resumed and len(kernel.forwards) == 1
    await fw.close("r-new")
    assert kernel.forwards == {} and fw.ports == {}
    assert fw.endpoint(resumed) == f"10.0.0.5:{old.host_port}"
    off = Forwards(RestorerConfig(host="h"), "t")
    sb = Sandbox("r", "d", 10, "snapscale-3", "10.213.0.14:8000")
    assert await off.open(sb) == sb and off.endpoint(sb) == "10.213.0.14:8000"
