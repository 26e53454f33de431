"""JSON Schema (draft 2020-12) of wire types, written from the same annotations and declared
limits (limits.py) that wire.py's decoder checks, so the two cannot drift apart: a gateway in
another language validates against it what the services would refuse. Pure, no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, get_args, get_origin

from snapscale.shared.core import wire
from snapscale.shared.core.limits import Limit

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def envelope(cls: type, type_name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of `cls` as `wire.encode` writes it: its fields plus `v` and `type`. Dataclasses
    it holds land in `defs` under their class names."""
    body = _object(cls, defs)
    body["properties"] = {
        "v": {"const": wire.SCHEMA_VERSION, "description": "schema version"},
        "type": {"const": type_name},
        **body["properties"],
    }
    body["required"] = ["v", "type", *body["required"]]
    return body


def _object(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        prop = field_schema(hints[f.name], defs)
        if f.default is not dataclasses.MISSING:
            prop["default"] = wire.to_plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            prop["default"] = wire.to_plain(f.default_factory())
        else:
            required.append(f.name)
        props[f.name] = prop
    out: dict[str, Any] = {"type": "object"}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # not the generated one
        out["description"] = " ".join(cls.__doc__.split())
    out.update(properties=props, required=required, additionalProperties=False)
    return out


def field_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one annotation, as wire.py's decoder reads it."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *marks = get_args(tp)
        out = field_schema(base, defs)
        for mark in marks:
            out.update(typing.cast(Limit, mark).schema())
        return out
    if origin is typing.Union or origin is types.UnionType:
        return {"anyOf": [field_schema(a, defs) for a in get_args(tp)]}
    if origin is typing.Literal:
        return {"enum": list(get_args(tp))}
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return {"type": "array", "items": field_schema(item_tp, defs)}
    if origin is dict:
        k_tp, v_tp = get_args(tp) or (str, Any)
        keys = field_schema(k_tp, defs)
        keys.pop("type", None)  # an object's keys are strings already
        out = {"type": "object", "additionalProperties": field_schema(v_tp, defs)}
        return {**out, "propertyNames": keys} if keys else out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder: a type that holds itself stops here
            defs[tp.__name__] = _object(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    simple = {float: "number", int: "integer", str: "string", bool: "boolean", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any:
        return {}
    raise TypeError(f"schema: unsupported annotation {tp!r}")
