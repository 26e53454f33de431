"""`snapscale checkpoints ls|show|verify|gc` as an operator runs them, on the local store and on
moto's S3 (configured only through the environment). The verbs run in-process through
`snapscale.cli.main` (fast); one runs as the console script to prove the wiring."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from conftest import S3Server

from snapscale.cli import main
from snapscale.shared.core.settings import Settings, StoreSettings
from snapscale.shared.store.backend import open_store
from snapscale.shared.store.checkpoint import upload_image
from snapscale.shared.store.manifest import Manifest

KEY = b"cli-key"


def make_image(d: Path) -> Path:
    d.mkdir()
    (d / "pages-1.img").write_bytes(os.urandom(300_000) + bytes(200_000))
    (d / "core-1.img").write_bytes(b"core" * 100)
    return d


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def __call__(self, env: dict[str, str], *args: str) -> Result:
        """Run a verb as `snapscale checkpoints ...` would, with `env` as its environment."""
        with self.monkeypatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            self.capsys.readouterr()
            rc = main(["checkpoints", *args])
            out = self.capsys.readouterr()
        return Result(rc, out.out, out.err)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(capsys, monkeypatch)


@pytest.fixture(params=["local", "s3"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[StoreSettings, dict[str, str]]:
    env = {"SNAPSCALE_SIGNING_KEY": KEY.decode(), "SNAPSCALE_STATE_DIR": str(tmp_path / "state")}
    if request.param == "local":
        url = f"file://{tmp_path}/store"
        env["SNAPSCALE_STORE"] = url
        return StoreSettings(url), env
    s3: S3Server = request.getfixturevalue("s3_server")
    url = f"s3://{s3.bucket}/cli-{tmp_path.name}"
    env.update(SNAPSCALE_STORE=url, AWS_ENDPOINT_URL=s3.endpoint_url)
    return StoreSettings(url, endpoint_url=s3.endpoint_url), env


async def _setup(ss: StoreSettings, img: Path) -> tuple[Manifest, str]:
    async with open_store(ss) as st:
        m, key, _ = await upload_image(
            st, img, deployment="demo", checkpoint_id="c1", compat={"criu": "4.2.1"}, compat_hash="abc",
            signing_key=KEY, chunk_bytes=1 << 16,
        )  # fmt: skip
        orphan = b"orphan"
        await st.put_chunk(hashlib.sha256(orphan).hexdigest(), orphan)
    return m, key


async def _drop_chunk(ss: StoreSettings, digest: str) -> None:
    async with open_store(ss) as st:
        await st.delete_chunk(digest)


def test_checkpoint_verbs(store_env: tuple[StoreSettings, dict[str, str]], tmp_path: Path, cli: Cli) -> None:
    # A sync test: the verbs call asyncio.run themselves, outside pytest's event loop.
    ss, env = store_env
    m, key = asyncio.run(_setup(ss, make_image(tmp_path / "img")))

    ls = cli(env, "ls")
    assert ls.returncode == 0, ls.stderr
    assert "demo" in ls.stdout and "c1" in ls.stdout and "abc" in ls.stdout
    rows = orjson.loads(cli(env, "ls", "--json").stdout)
    assert rows[0]["checkpoint_id"] == "c1" and rows[0]["total_bytes"] == m.total_bytes

    show = cli(env, "show", "demo/c1")
    assert show.returncode == 0 and "pages-1.img" in show.stdout and "signature ok" in show.stdout
    assert orjson.loads(cli(env, "show", key, "--json").stdout)["checkpoint_id"] == "c1"

    ok = cli(env, "verify", "demo/c1")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr

    gc = cli(env, "gc", "--grace", "0s", "--dry-run")
    assert gc.returncode == 0 and "would delete 1 chunks" in gc.stdout and "younger than 0s" in gc.stdout
    plan = orjson.loads(cli(env, "gc", "--grace", "0s", "--dry-run", "--json").stdout)
    assert plan["dry_run"] and len(plan["delete"]) == 1 and plan["grace_s"] == 0.0
    gc = cli(env, "gc", "--grace-s", "0")  # the former spelling still works
    assert "deleted 1 chunks" in gc.stdout
    assert cli(env, "verify", "demo/c1").returncode == 0  # referenced chunks survived

    asyncio.run(_drop_chunk(ss, sorted(m.digests())[0]))
    bad = cli(env, "verify", "demo/c1", "--shallow")
    assert bad.returncode == 1 and "missing" in bad.stdout
    report = cli(env, "verify", "demo/c1", "--json")
    assert report.returncode == 1 and orjson.loads(report.stdout)["missing"] == [sorted(m.digests())[0]]

    wrong_key = cli({**env, "SNAPSCALE_SIGNING_KEY": "other"}, "show", "demo/c1")
    assert wrong_key.returncode == 1 and "signature does not match" in wrong_key.stderr
    assert "REFUSED" in cli({**env, "SNAPSCALE_SIGNING_KEY": "other"}, "ls").stdout
    nothing = cli(env, "show", "demo/none")
    assert nothing.returncode == 3 and "not in the store" in nothing.stderr  # not found
    bad_ref = cli(env, "show", "../x")
    assert bad_ref.returncode == 2 and "not <deployment>/<checkpoint-id>" in bad_ref.stderr


def test_console_script_runs_a_verb(tmp_path: Path) -> None:
    env = {**os.environ, "SNAPSCALE_STORE": f"file://{tmp_path}/store", "SNAPSCALE_SIGNING_KEY": "k"}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "snapscale"), "checkpoints", "ls", "--json"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout) == []


def test_settings_from_env_reach_the_store(tmp_path: Path) -> None:
    s = Settings.from_env({"SNAPSCALE_STORE": f"file://{tmp_path}/s"})
    assert s.store.local_path == tmp_path / "s"


def test_verify_reports_each_chunk_as_it_goes(tmp_path: Path) -> None:
    """What `checkpoints verify` draws its progress from: one call per chunk, with its bytes."""
    from snapscale.shared.store.checkpoint import verify_checkpoint

    ss = StoreSettings(f"file://{tmp_path}/store")
    m, _key = asyncio.run(_setup(ss, make_image(tmp_path / "img")))
    seen: list[int] = []

    async def run() -> int:
        async with open_store(ss) as st:
            rep = await verify_checkpoint(st, m, on_chunk=seen.append)
            return rep.bytes_checked

    checked = asyncio.run(run())
    assert len(seen) == len(m.digests()) and sum(seen) == checked > 0
