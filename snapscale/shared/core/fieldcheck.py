"""Checking what an operator wrote (a TOML table, a JSON object) against a frozen dataclass, every
problem at once, each with its field path: unknown keys (with a "did you mean"), missing and
mistyped fields, non-finite numbers, values outside what the class declares.

A class declares its rules as data next to its fields, so a field added later only adds a line:

    LIMITS: ClassVar[Limits] = {"port": Range(1, 65535), "name": Check(check_name)}
    ORDER: ClassVar[Order] = (("min_replicas", "max_replicas"),)  # the first <= the second

Pure; types are checked by `wire` (one decoder), this adds what a type cannot say.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from snapscale.shared.core import wire
from snapscale.shared.core.errors import ConfigError, MessageError


class Rule(Protocol):
    def problem(self, value: Any) -> str | None:
        """Why `value` is refused, or None when it is fine."""
        ...


@dataclass(frozen=True)
class Range:
    """A number within [lo, hi]; `above` makes lo itself refused (e.g. a timeout > 0)."""

    lo: float
    hi: float
    unit: str = ""
    above: bool = False

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None  # the type check reports it
        low_ok = value > self.lo if self.above else value >= self.lo
        if low_ok and value <= self.hi:
            return None
        u = f" {self.unit}" if self.unit else ""
        lo = f"above {self.lo:g}" if self.above else f"at least {self.lo:g}"
        return f"must be {lo} and at most {self.hi:g}{u}, got {value!r}"


@dataclass(frozen=True)
class Check:
    """Any test: `fn(value)` raises ValueError with the reason when the value is refused."""

    fn: Callable[[Any], object]

    def problem(self, value: Any) -> str | None:
        try:
            self.fn(value)
        except ValueError as e:
            return str(e)
        return None


Limits = Mapping[str, Rule]
Order = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Problem:
    path: str  # e.g. "scaling.max_replicas"
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class FieldsError(ConfigError):
    """`what` was refused; `problems` lists every reason with its field path, one per line."""

    def __init__(self, what: str, problems: Sequence[Problem]) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        n = len(problems)
        super().__init__(f"{what}: {n} problem{'s' if n != 1 else ''}:\n{lines}")
        self.problems = list(problems)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass an annotation names (also inside `X | None`), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check(cls: type, data: Any, path: str = "") -> list[Problem]:
    """Every problem of `data` as an instance of the dataclass `cls` (empty when it builds)."""
    if not isinstance(data, dict):
        return [Problem(path or "<top>", f"expected a table, got {type(data).__name__}")]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: list[Problem] = []
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(fields)})"
            out.append(Problem(_join(path, str(key)), "unknown key" + hint))
    limits: Limits = getattr(cls, "LIMITS", {})
    bad: set[str] = set()
    for name, f in fields.items():
        here = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                out.append(Problem(here, "missing"))
                bad.add(name)
            continue
        value = data[name]
        sub = _dataclass_in(_hints(cls)[name])
        if sub is not None and value is not None:
            found = check(sub, value, here)
        else:
            found = _check_value(_hints(cls)[name], value, here, limits.get(name))
        if found:
            bad.add(name)
            out.extend(found)
    for lo, hi in getattr(cls, "ORDER", ()):
        if lo in bad or hi in bad:
            continue
        a, b = _value(fields[lo], data), _value(fields[hi], data)
        if a > b:
            out.append(Problem(_join(path, lo), f"{a!r} is above {hi} ({b!r})"))
    return out


def _check_value(tp: Any, value: Any, path: str, rule: Rule | None) -> list[Problem]:
    try:
        wire.from_plain(typing.cast(type[Any], tp), value, path)
    except MessageError as e:
        return [Problem(e.field, e.reason)]
    if isinstance(value, float) and not math.isfinite(value):
        return [Problem(path, f"must be a finite number, got {value!r}")]
    why = rule.problem(value) if rule is not None and value is not None else None
    return [Problem(path, why)] if why else []


def _value(f: dataclasses.Field[Any], data: Mapping[str, Any]) -> Any:
    if f.name in data:
        return data[f.name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
