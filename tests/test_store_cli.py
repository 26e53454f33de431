"""`snapscale checkpoints ls|show|verify|gc` as an operator runs them, on the local store and on
moto's S3 (configured only through the environment)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import S3Server

from snapscale.shared.checkpoint import upload_image
from snapscale.shared.settings import Settings, StoreSettings
from snapscale.shared.store import open_store

KEY = b"cli-key"


def make_image(d: Path) -> Path:
    d.mkdir()
    (d / "pages-1.img").write_bytes(os.urandom(300_000) + bytes(200_000))
    (d / "core-1.img").write_bytes(b"core" * 100)
    return d


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapscale", "checkpoints", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env}, check=False,
    )  # fmt: skip


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


async def test_checkpoint_verbs(store_env: tuple[StoreSettings, dict[str, str]], tmp_path: Path) -> None:
    ss, env = store_env
    img = make_image(tmp_path / "img")
    async with open_store(ss) as st:
        m, key, _ = await upload_image(
            st, img, deployment="demo", checkpoint_id="c1", compat={"criu": "4.2.1"}, compat_hash="abc",
            signing_key=KEY, chunk_bytes=1 << 16,
        )  # fmt: skip
        orphan = b"orphan"
        await st.put_chunk(hashlib.sha256(orphan).hexdigest(), orphan)

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

    gc = cli(env, "gc", "--grace-s", "0", "--dry-run")
    assert gc.returncode == 0 and "would delete 1 chunks" in gc.stdout
    gc = cli(env, "gc", "--grace-s", "0")
    assert "deleted 1 chunks" in gc.stdout
    assert cli(env, "verify", "demo/c1").returncode == 0  # referenced chunks survived

    async with open_store(ss) as st:
        await st.delete_chunk(sorted(m.digests())[0])
    bad = cli(env, "verify", "demo/c1", "--shallow")
    assert bad.returncode == 1 and "missing" in bad.stdout

    wrong_key = cli({**env, "SNAPSCALE_SIGNING_KEY": "other"}, "show", "demo/c1")
    assert wrong_key.returncode == 2 and "signature does not match" in wrong_key.stderr
    assert "REFUSED" in cli({**env, "SNAPSCALE_SIGNING_KEY": "other"}, "ls").stdout
    nothing = cli(env, "show", "demo/none")
    assert nothing.returncode == 2 and "not in the store" in nothing.stderr
    assert "not <deployment>/<checkpoint-id>" in cli(env, "show", "../x").stderr


def test_settings_from_env_reach_the_store(tmp_path: Path) -> None:
    s = Settings.from_env({"SNAPSCALE_STORE": f"file://{tmp_path}/s"})
    assert s.store.local_path == tmp_path / "s"
