"""The JSON Schema of every message on the bus, and of the KV values services read, with the
subject each travels on: written from the message types (core/schema.py) into
docs/schema/messages.json, for gateways and tools in other languages. A test fails when the
checked-in file differs from what this writes; `python -m snapscale.shared.bus.schema` rewrites it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from snapscale.shared.bus.catalog import CATALOG_TYPE, CatalogEntry
from snapscale.shared.bus.messages import (
    MAX_MESSAGE_BYTES,
    CheckpointEvent,
    FreezeCommand,
    HostHeartbeat,
    PrefetchCommand,
    ReleaseCommand,
    ReplicaEvent,
    ScaleUpCommand,
    TrafficEvent,
)
from snapscale.shared.bus.refusals import REFUSAL_TYPE, FreezeRefusal
from snapscale.shared.bus.subjects import Bucket, Subjects, Verb
from snapscale.shared.core import schema

PATH = Path("docs/schema/messages.json")

_S = Subjects("NS")
_D, _H = "DEPLOYMENT", "HOST"
_TO_RESTORER = "JetStream, scaler -> restorer"


def _shown(subject: str) -> str:
    return subject.replace("NS.", "<namespace>.").replace(_D, "<deployment>").replace(_H, "<host>")


# (type, its `type` on the wire, where it travels, how)
KINDS: list[tuple[type, str, str, str]] = [
    (TrafficEvent, TrafficEvent.TYPE, _S.traffic(_D), "core NATS, gateway -> scaler"),
    (ScaleUpCommand, ScaleUpCommand.TYPE, _S.cmd(Verb.SCALE_UP, _H), _TO_RESTORER),
    (ReleaseCommand, ReleaseCommand.TYPE, _S.cmd(Verb.RELEASE, _H), _TO_RESTORER),
    (PrefetchCommand, PrefetchCommand.TYPE, _S.cmd(Verb.PREFETCH, _H), _TO_RESTORER),
    (FreezeCommand, FreezeCommand.TYPE, _S.cmd(Verb.FREEZE, _H), "JetStream, scaler or restorer -> freezer"),
    (ReplicaEvent, ReplicaEvent.TYPE, _S.evt_replica(_D),
     f"JetStream, restorer -> scaler; the value of KV `{Bucket.REPLICAS.value}` <deployment>.<replica>"),
    (CheckpointEvent, CheckpointEvent.TYPE, _S.evt_checkpoint(_D), "JetStream, freezer -> scaler"),
    (HostHeartbeat, HostHeartbeat.TYPE, _S.evt_host(_H),
     f"core NATS, restorer -> scaler; the value of KV `{Bucket.HOSTS.value}` <host>"),
    (CatalogEntry, CATALOG_TYPE, "-",
     f"the value of KV `{Bucket.CHECKPOINTS.value}` <deployment>.<compat_hash>, freezer -> all"),
    (FreezeRefusal, REFUSAL_TYPE, "-",
     f"the value of KV `{Bucket.LEASES.value}` unfreezable.<deployment>.<compat_hash>, scaler -> all"),
]  # fmt: skip


def messages_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for cls, type_name, subject, how in KINDS:
        body = schema.envelope(cls, type_name, defs)
        body["x-subject"] = _shown(subject)
        body["x-transport"] = how
        defs[cls.__name__] = body
    return {
        "$schema": schema.DRAFT,
        "title": "snapscale wire messages",
        "description": (
            "Every message is one JSON object of at most "
            f"{MAX_MESSAGE_BYTES} bytes; its `type` says which. Subjects are prefixed by the "
            "namespace (default `snapscale`). Generated from snapscale/shared/bus/messages.py by "
            "`python -m snapscale.shared.bus.schema`: do not edit by hand."
        ),
        "x-max-bytes": MAX_MESSAGE_BYTES,
        "oneOf": [{"$ref": f"#/$defs/{cls.__name__}"} for cls, *_ in KINDS],
        "$defs": dict(sorted(defs.items())),
    }


def render() -> bytes:
    """The file's bytes: stable key order and indentation, so a change shows as a small diff."""
    return orjson.dumps(messages_schema(), option=orjson.OPT_INDENT_2) + b"\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
