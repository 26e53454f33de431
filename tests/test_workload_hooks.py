"""The hook protocol between the engine and a workload with weights outside the image: the bodies
both sides build and read, and the sample sandbox speaking it over HTTP (`--weights-outside`)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import ROOT
from workload_helpers import chunk_dir

from snapscale.shared.engine import probe
from snapscale.workload import ChunkDir, FdHandover, SourceFiles, WeightsError, hooks
from snapscale.workload.errors import ProtocolError
from snapscale.workload.record import WeightsRecord


def test_bodies_round_trip() -> None:
    assert hooks.read_freeze_request(hooks.freeze_request(release=True)) is True
    assert hooks.read_freeze_request(hooks.freeze_request(release=False)) is False
    fd = (FdHandover("/run/s.sock"), FdHandover("/run/s.sock", fallback="/var/cache/chunks"))
    for src in (ChunkDir("/var/cache/chunks"), SourceFiles(verify=False), *fd, None):
        assert hooks.read_restore_request(hooks.restore_request(src)) == src


def test_an_engine_that_says_nothing_asks_nothing() -> None:
    assert hooks.read_freeze_request(b"") is False
    assert hooks.read_freeze_request(b'{"other": 1}') is False
    assert hooks.read_restore_request(b"") is None
    # a workload that does not use the library: no record, whatever it answers
    assert hooks.read_freeze_answer(b'{"kv": false}') is None
    assert hooks.read_freeze_answer(b"ok") is None
    assert hooks.read_freeze_answer(b"") is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{", "before_freeze body: not JSON"),
        (b'{"snapscale": {"protocol": 9}}', r"snapscale\.protocol: 9; this library speaks 1"),
        (b'{"snapscale": [1]}', "snapscale: expected an object"),
        (b'{"snapscale": {"protocol": 1, "weights": {"release": "yes"}}}', r"weights\.release: expected"),
    ],
)
def test_bad_freeze_requests_name_the_field(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        hooks.read_freeze_request(body)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"source": "tape"}, r"weights\.source: must be 'chunks', 'files' or 'fd', got 'tape'"),
        ({"source": "chunks"}, r"weights\.dir: missing"),
        ({"source": "chunks", "dir": "rel/dir"}, r"weights\.dir: expected an absolute path"),
        ({"source": "fd"}, r"weights\.socket: missing"),
        ({"source": "fd", "socket": "/s", "dir": 7}, r"weights\.dir: expected an absolute path, got 7"),
        ({"source": "files", "verify": 1}, r"weights\.verify: expected true or false"),
        ("chunks", r"snapscale\.weights: expected an object"),
    ],
)
def test_bad_restore_requests_name_the_field(weights: object, match: str) -> None:
    body = json.dumps({"snapscale": {"protocol": 1, "weights": weights}}).encode()
    with pytest.raises(ProtocolError, match=match):
        hooks.read_restore_request(body)


def test_a_bad_record_in_an_answer_names_the_field() -> None:
    body = json.dumps({"snapscale": {"weights": {"format": 1}}}).encode()
    with pytest.raises(WeightsError, match=r"snapscale\.weights\.chunk_bytes: missing"):
        hooks.read_freeze_answer(body)


# -- the sample sandbox, over HTTP --
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("sample")
    port = free_port()
    cmd = [sys.executable, "-m", "examples.sample_server.server", "--preset", "tiny", "--port", str(port),
           "--kv-mib", "1", "--weights", str(work / "tiny.safetensors"), "--weights-outside"]  # fmt: skip
    log = open(work / "log", "wb")  # noqa: SIM115
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"
    try:
        asyncio.run(up(endpoint, p))
        yield endpoint
    finally:
        p.kill()
        p.wait()
        log.close()


async def up(endpoint: str, p: subprocess.Popen[bytes]) -> None:
    for _ in range(1200):
        assert p.poll() is None, "the sample exited"
        try:
            if (await probe.http_request("GET", endpoint, "/healthz", timeout_s=2))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the sample did not come up in 120s")


async def post(endpoint: str, path: str, body: bytes = b"") -> tuple[int, dict[str, object]]:
    status, data = await probe.http_request("POST", endpoint, path, timeout_s=30, body=body)
    return status, json.loads(data)


async def test_the_sample_releases_only_when_offered_and_fills_back(sample: str, tmp_path: Path) -> None:
    _, ref = await post(sample, "/generate")
    # Today's engine: no offer, no record; the weights stay and it answers as before.
    status, ans = await post(sample, "/hooks/before_freeze")
    assert status == 200 and "snapscale" not in ans
    assert await post(sample, "/hooks/after_restore") == (200, {"kv": True})
    assert await post(sample, "/generate") == (200, ref)

    status, ans = await post(sample, "/hooks/before_freeze", hooks.freeze_request(release=True))
    assert status == 200
    record = WeightsRecord.from_plain(ans["snapscale"]["weights"])  # type: ignore[index]
    assert record.arena.kind == "host" and record.nbytes > 0
    status, _ = await post(sample, "/generate")
    assert status == 503  # released: it refuses instead of reading unmapped memory
    # a bad body is the caller's mistake: 400, and the weights stay released
    bad = json.dumps({"snapscale": {"protocol": 1, "weights": {"source": "chunks"}}}).encode()
    status, err = await post(sample, "/hooks/after_restore", bad)
    assert status == 400 and "snapscale.weights.dir: missing" in str(err["error"])
    # chunks that are not there: the fill fails (500), still released
    empty = tmp_path / "chunks"
    empty.mkdir()
    status, err = await post(sample, "/hooks/after_restore", hooks.restore_request(ChunkDir(str(empty))))
    assert status == 500 and "cannot open" in str(err["error"])
    assert (await post(sample, "/generate"))[0] == 503
    # the host cache's chunk files, as a restorer would name them
    chunk_dir(record, empty)
    status, _ = await post(sample, "/hooks/after_restore", hooks.restore_request(ChunkDir(str(empty))))
    assert status == 200
    assert await post(sample, "/generate") == (200, ref)
    _, timings = await probe.http_request("GET", sample, "/timings", timeout_s=5)
    assert "weights_restore_s" in json.loads(timings)
