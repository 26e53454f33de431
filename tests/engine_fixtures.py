"""Fixtures the engine tests share: a tag on every process a test starts, the sandboxes it made
(stopped afterwards), and the sample's answer. Import the fixtures by name into a test module."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from engine_helpers import kill_tagged

from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.lifecycle import Sandbox


@pytest.fixture
async def tag() -> AsyncIterator[str]:
    """A marker on every process the test starts; whatever still carries it afterwards is killed."""
    t = f"enginetest-{uuid.uuid4().hex[:12]}"
    yield t
    kill_tagged(t)


@pytest.fixture
async def made() -> AsyncIterator[list[Sandbox]]:
    sbs: list[Sandbox] = []
    yield sbs
    for sb in sbs:
        await engine.stop(sb)


async def answer(sb: Sandbox) -> bytes:
    status, body = await probe.http_request("GET", sb.endpoint, "/generate", timeout_s=30)
    assert status == 200, body
    return body
