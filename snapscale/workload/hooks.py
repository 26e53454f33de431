"""The hook protocol between the engine and a workload that keeps its weights outside the image.

before_freeze: the engine's POST body offers to carry the weights (`{"snapscale": {"protocol": 1,
"weights": {"release": true}}}`); a workload that took the offer answers its record
(`{"snapscale": {"weights": <WeightsRecord>}}`, beside its own keys). An engine that makes no offer
(an empty body) gets no record and the weights stay in the process, as without the library.
after_restore: the engine's body says where the weights come from (`{"snapscale": {"protocol": 1,
"weights": <source>}}`): whole chunk files in a directory (the host cache), the record's own source
files, or memory a host process filled and hands over as file descriptors. No source: the source
files, verified. Pure and standard library only (the sandbox imports it); both sides use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from snapscale.workload.errors import ProtocolError
from snapscale.workload.record import WeightsRecord

PROTOCOL = 1


@dataclass(frozen=True)
class ChunkDir:
    """Chunk files named by their sha256 under `dir`, already verified (the host cache)."""

    dir: str


@dataclass(frozen=True)
class SourceFiles:
    """The files the record names, each chunk hashed on the way when `verify`."""

    verify: bool = True


@dataclass(frozen=True)
class FdHandover:
    """A host process filled fresh GPU memory and hands it over on the Unix socket at `socket`;
    when that fails, the chunk files in `fallback` (if named) fill the weights instead."""

    socket: str
    fallback: str | None = None


FillSource = ChunkDir | SourceFiles | FdHandover


def freeze_request(*, release: bool) -> bytes:
    """The engine's before_freeze body."""
    return _dump({"snapscale": {"protocol": PROTOCOL, "weights": {"release": release}}})


def read_freeze_request(body: bytes) -> bool:
    """The workload's side: was it asked to release its weights? An empty body asks nothing."""
    w = _section(body, "before_freeze").get("weights")
    if w is None:
        return False
    if not isinstance(w, dict) or not isinstance(w.get("release"), bool):
        raise ProtocolError("snapscale.weights.release", "expected true or false")
    return bool(w["release"])


def freeze_answer(record: WeightsRecord | None) -> dict[str, Any]:
    """What the workload adds to its before_freeze answer (nothing when it kept its weights)."""
    return {} if record is None else {"snapscale": {"weights": record.to_plain()}}


def read_freeze_answer(body: bytes) -> WeightsRecord | None:
    """The engine's side: the record of weights the workload released, or None (it kept them, or
    it does not use the library: any answer without our section)."""
    try:
        doc = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return None  # not JSON: a workload that does not speak this protocol
    sec = doc.get("snapscale") if isinstance(doc, dict) else None
    if not isinstance(sec, dict) or sec.get("weights") is None:
        return None
    return WeightsRecord.from_plain(sec["weights"], "snapscale.weights")


def restore_request(source: FillSource | None) -> bytes:
    """The engine's after_restore body."""
    w: dict[str, Any] | None
    if source is None:
        w = None
    elif isinstance(source, ChunkDir):
        w = {"source": "chunks", "dir": source.dir}
    elif isinstance(source, SourceFiles):
        w = {"source": "files", "verify": source.verify}
    else:
        w = {"source": "fd", "socket": source.socket}
        if source.fallback is not None:
            w["dir"] = source.fallback
    return _dump({"snapscale": {"protocol": PROTOCOL, "weights": w}})


def read_restore_request(body: bytes) -> FillSource | None:
    """The workload's side: where its weights come from after this restore (None: not said)."""
    w = _section(body, "after_restore").get("weights")
    if w is None:
        return None
    at = "snapscale.weights"
    if not isinstance(w, dict):
        raise ProtocolError(at, f"expected an object, got {type(w).__name__}")
    kind = w.get("source")
    if kind == "chunks":
        return ChunkDir(_path(w, "dir", at))
    if kind == "files":
        verify = w.get("verify", True)
        if not isinstance(verify, bool):
            raise ProtocolError(f"{at}.verify", f"expected true or false, got {verify!r}")
        return SourceFiles(verify)
    if kind == "fd":
        return FdHandover(_path(w, "socket", at), _path(w, "dir", at) if "dir" in w else None)
    raise ProtocolError(f"{at}.source", f"must be 'chunks', 'files' or 'fd', got {kind!r}")


def _section(body: bytes, hook: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{hook} body", f"not JSON: {e}") from None
    sec = doc.get("snapscale") if isinstance(doc, dict) else None
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise ProtocolError("snapscale", f"expected an object, got {type(sec).__name__}")
    if sec.get("protocol") != PROTOCOL:
        raise ProtocolError("snapscale.protocol", f"{sec.get('protocol')!r}; this library speaks {PROTOCOL}")
    return sec


def _path(w: dict[str, Any], key: str, at: str) -> str:
    v = w.get(key)
    if not isinstance(v, str) or not v.startswith("/"):
        raise ProtocolError(
            f"{at}.{key}", "missing" if v is None else f"expected an absolute path, got {v!r}"
        )
    return v


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
