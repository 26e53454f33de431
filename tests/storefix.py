"""Fixtures shared by the store tests: a real CRIU image, both store backends, a fault proxy.

Import the fixtures into a test module by name (`from storefix import store, ...`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import S3Server
from criu_image import dump_image
from faultproxy import FaultProxy

from snapscale.shared.core.settings import Settings, StoreSettings
from snapscale.shared.engine.criu import CriuBinary
from snapscale.shared.store.backend import ChunkStore, open_store
from snapscale.shared.store.s3 import RetryPolicy, S3Store

KEY = b"test-signing-key"
FAST_RETRY = RetryPolicy(attempts=10, base_delay_s=0.02, max_delay_s=0.25)  # >= 0.77 s of retrying


@pytest.fixture(scope="session")
def image_dir(criu: CriuBinary, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CRIU image dir (dumped once per session). Tests must not modify it."""
    return dump_image(criu, tmp_path_factory.mktemp("criu"))


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[ChunkStore]:
    """Each test that takes `store` runs against the local directory store and moto's S3."""
    if request.param == "local":
        async with open_store(settings.store) as st:
            yield st
        return
    s3: Settings = request.getfixturevalue("s3_settings")
    st3 = await S3Store.open(s3.store, FAST_RETRY)
    try:
        yield st3
    finally:
        await st3.close()


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy(s3_server.endpoint_url).start()
    yield p
    await p.stop()


@pytest.fixture
async def proxied_store(proxy: FaultProxy, s3_settings: Settings) -> AsyncIterator[S3Store]:
    """An S3 store whose every request goes through `proxy`."""
    ss: StoreSettings = replace(s3_settings.store, endpoint_url=proxy.url, max_concurrency=8)
    st = await S3Store.open(ss, FAST_RETRY)
    try:
        yield st
    finally:
        await st.close()
