"""Pure encoding of frozen dataclasses to JSON bytes (orjson) and strict, typed decoding back.

Decoding checks every field against its annotation, and against the limits an `Annotated` field
declares (limits.py), and raises `MessageError` naming the field. Bytes off the wire (`decode`)
are held to more: a size limit, and no field the type does not have (a misspelt optional field
would otherwise read as its default). No I/O here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from functools import cache
from typing import Any, TypeVar, get_args, get_origin

import orjson

from snapscale.shared.core.errors import MessageError
from snapscale.shared.core.limits import SHOWN_CHARS, Limit, shown

T = TypeVar("T")

SCHEMA_VERSION = 1


def to_plain(obj: object) -> Any:
    """A dataclass (or container of them) as plain JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def canonical(obj: object) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace. Signatures and hashes are taken over these."""
    return orjson.dumps(to_plain(obj), option=orjson.OPT_SORT_KEYS)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def from_plain(cls: type[T], data: Any, path: str = "", *, strict: bool = False) -> T:
    """Build `cls` from plain values, checking types and declared limits; `path` prefixes field
    names in errors. `strict` refuses fields the dataclasses do not have."""
    return typing.cast(T, _convert(cls, data, path or cls.__name__, strict))


def _convert(tp: Any, value: Any, path: str, strict: bool = False) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        base, *marks = get_args(tp)
        out = _convert(base, value, path, strict)
        for mark in marks:
            why = typing.cast(Limit, mark).problem(out)
            if why is not None:
                raise MessageError(path, why)
        return out
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[str] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, strict)
            except MessageError as e:
                errors.append(e.reason)
        raise MessageError(path, "; ".join(errors) or "null not allowed")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise MessageError(path, f"must be one of {list(get_args(tp))}, got {shown(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise MessageError(path, f"expected a list, got {type(value).__name__}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{path}[{i}]", strict) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageError(path, f"expected an object, got {type(value).__name__}")
        k_tp, v_tp = get_args(tp) or (str, Any)
        plain: dict[Any, Any] = {}
        for k, v in value.items():
            at = f"{path}.{k}" if len(str(k)) <= SHOWN_CHARS else f"{path}[{shown(k)}]"
            plain[_convert(k_tp, str(k), f"{at} (key)", strict)] = _convert(v_tp, v, at, strict)
        return plain
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MessageError(path, f"expected an object, got {type(value).__name__}")
        hints = _hints(tp)
        fields = dataclasses.fields(tp)
        if strict and (unknown := sorted(set(value) - {f.name for f in fields}, key=str)):
            raise MessageError(f"{path}.{shown(unknown[0])}", "unknown field")
        kwargs: dict[str, Any] = {}
        for f in fields:
            if f.name in value:
                kwargs[f.name] = _convert(hints[f.name], value[f.name], f"{path}.{f.name}", strict)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{path}.{f.name}", "missing")
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise MessageError(path, f"must be one of {[m.value for m in tp]}, got {shown(value)}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MessageError(path, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):  # JSON has none; TOML and Python callers do
            raise MessageError(path, f"must be a finite number, got {value}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # JSON has one number type: 3.0 is 3
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(path, f"expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise MessageError(path, f"expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"wire: unsupported annotation {tp!r} at {path}")


def encode(msg: object, type_name: str) -> bytes:
    """Wire bytes: the message's fields plus `v` (schema version) and `type`."""
    body = to_plain(msg)
    body["v"] = SCHEMA_VERSION
    body["type"] = type_name
    return orjson.dumps(body)


def decode(data: bytes, cls: type[T], type_name: str, *, max_bytes: int | None = None) -> T:
    """Parse wire bytes into `cls`; any problem is a `MessageError` that names the field. Bytes over
    `max_bytes` are refused unread, and so is a field `cls` does not have."""
    if max_bytes is not None and len(data) > max_bytes:
        raise MessageError("<body>", f"{len(data)} bytes, over the limit of {max_bytes}")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MessageError("<body>", f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise MessageError("<body>", f"expected a JSON object, got {type(body).__name__}")
    v = body.pop("v", None)
    if v != SCHEMA_VERSION:
        raise MessageError("v", f"unsupported schema version {shown(v)} (this build speaks {SCHEMA_VERSION})")
    t = body.pop("type", None)
    if t != type_name:
        raise MessageError("type", f"expected {type_name!r}, got {shown(t)}")
    return from_plain(cls, body, type_name, strict=True)


def salvage(data: bytes, cls: type, names: tuple[str, ...], *, max_bytes: int) -> dict[str, Any]:
    """Of a body `decode` refused, the fields `names` that each pass their own declaration: what a
    refusal may safely name (the replica to report failed). Empty when the body is not a JSON
    object within `max_bytes`; nothing else of it is trusted."""
    if len(data) > max_bytes:
        return {}
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(body, dict):
        return {}
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for name in names:
        if name in body:
            try:
                out[name] = _convert(hints[name], body[name], name)
            except MessageError:
                continue
    return out
