"""docs/schema/messages.json is what the code writes, and says what the decoder does: every
sample message passes both, and each bad input the decoder refuses, the schema refuses too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from test_wire import SAMPLES

from snapscale.shared.bus import schema
from snapscale.shared.bus.catalog import CatalogEntry, decode_entry, encode_entry
from snapscale.shared.bus.messages import (
    MAX_MESSAGE_BYTES,
    ScaleUpCommand,
    TrafficEvent,
    decode_message,
    encode_message,
)
from snapscale.shared.core.errors import MessageError

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = jsonschema.Draft202012Validator(schema.messages_schema())
ENTRY = CatalogEntry("llm", "a" * 64, "20261128T003512345Z-1a2b3c", "p/manifests/llm/x.json", 5.0, host="h")


def test_the_checked_in_schema_is_what_the_code_writes() -> None:
    on_disk = (ROOT / schema.PATH).read_bytes()
    assert on_disk == schema.render(), "run `python -m snapscale.shared.bus.schema` and commit the file"


def test_the_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema.messages_schema())


@pytest.mark.parametrize("msg", [*SAMPLES, ENTRY], ids=lambda m: type(m).__name__)
def test_every_sample_passes_the_schema(msg: object) -> None:
    data = encode_entry(msg) if isinstance(msg, CatalogEntry) else encode_message(msg)  # type: ignore[arg-type]
    VALIDATOR.validate(orjson.loads(data))


def _cmd(**over: Any) -> dict[str, Any]:
    body = orjson.loads(encode_message(ScaleUpCommand(id="c1", deployment="d", replica="r1", issued_at=1.0)))
    return {**body, **over}


BAD: list[tuple[str, dict[str, Any]]] = [
    ("dot in deployment", _cmd(deployment="a.b")),
    ("slash in replica", _cmd(replica="../r")),
    ("empty replica", _cmd(replica="")),
    ("long replica", _cmd(replica="r" * 129)),
    ("wrong type", _cmd(issued_at="now")),
    ("negative time", _cmd(issued_at=-1.0)),
    ("absurd deadline", _cmd(deadline_s=1.7e308)),
    ("unknown field", _cmd(replcia="r2")),
    ("missing field", {k: v for k, v in _cmd().items() if k != "replica"}),
    ("unknown tier", _cmd(allow_tiers=["warp"])),
    ("comma in a GPU", _cmd(gpu_uuids=["GPU-a,GPU-b"])),
    ("wrong version", _cmd(v=2)),
    ("absurd concurrency", {"v": 1, "type": "traffic", "deployment": "d", "ts": 1.0, "concurrency": 1.7e308}),
    ("a float count", {"v": 1, "type": "traffic", "deployment": "d", "ts": 1.0, "arrivals": 1.5}),
]


@pytest.mark.parametrize(("what", "body"), BAD, ids=[w for w, _ in BAD])
def test_what_the_decoder_refuses_the_schema_refuses(what: str, body: dict[str, Any]) -> None:
    cls = TrafficEvent if body.get("type") == "traffic" else ScaleUpCommand
    with pytest.raises(MessageError):
        decode_message(orjson.dumps(body), cls)
    assert not VALIDATOR.is_valid(body), what


def test_an_integral_float_is_an_integer_to_both() -> None:
    body = {"v": 1, "type": "traffic", "deployment": "d", "ts": 1.0, "arrivals": 3.0}
    assert VALIDATOR.is_valid(body)
    assert decode_message(orjson.dumps(body), TrafficEvent).arrivals == 3


def test_catalog_entries_are_held_to_their_limits_too() -> None:
    assert decode_entry(encode_entry(ENTRY)) == ENTRY
    bad = {**orjson.loads(encode_entry(ENTRY)), "checkpoint_id": "../../x"}
    with pytest.raises(MessageError) as ei:
        decode_entry(orjson.dumps(bad))
    assert ei.value.field == "catalog-entry.checkpoint_id"
    assert not VALIDATOR.is_valid(bad)


def test_the_schema_states_the_size_limit() -> None:
    assert schema.messages_schema()["x-max-bytes"] == MAX_MESSAGE_BYTES
