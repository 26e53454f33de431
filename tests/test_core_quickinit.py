"""quick_init: the faster __init__ builds what the dataclass's own would, and stays frozen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from snapscale.shared.bus import HostHeartbeat, ReplicaEvent, ReplicaState
from snapscale.shared.core.quickinit import quick_init


@dataclass(frozen=True)
class Plain:
    a: str
    b: int = 3
    c: list[int] = field(default_factory=list)


@quick_init
@dataclass(frozen=True)
class Quick:
    a: str
    b: int = 3
    c: list[int] = field(default_factory=list)


def test_builds_the_same_fields_defaults_and_fresh_factories() -> None:
    for args, kw in (((("x",)), {}), (("x", 5), {}), (("x",), {"c": [1]}), ((), {"a": "y", "b": 0})):
        q, p = Quick(*args, **kw), Plain(*args, **kw)
        assert dataclasses.asdict(q) == dataclasses.asdict(p)
    assert "_NOTHING" in Quick.__init__.__globals__  # the quick one, not the dataclass's own
    assert Quick("x").c is not Quick("x").c  # a new list each time, as default_factory makes
    with pytest.raises(TypeError):
        Quick()  # type: ignore[call-arg]  # the required field is still required
    with pytest.raises(TypeError):
        Quick("x", nope=1)  # type: ignore[call-arg]


def test_any_other_factory_is_still_called_fresh() -> None:
    @quick_init
    @dataclass(frozen=True)
    class Made:
        s: set[int] = field(default_factory=set)
        seven: list[int] = field(default_factory=lambda: [7])

    one, two = Made(), Made()
    assert one == Made(set(), [7]) and one.s is not two.s and one.seven is not two.seven


def test_a_message_stays_frozen_comparable_and_replaceable() -> None:
    hb = HostHeartbeat("h1", 1.0, "k")
    assert hb == HostHeartbeat(host="h1", ts=1.0, compat_hash="k") and hb.interval_s == 5.0
    assert hb.gpus == [] and hb.gpus is not HostHeartbeat("h1", 1.0, "k").gpus
    with pytest.raises(dataclasses.FrozenInstanceError):
        hb.host = "h2"  # type: ignore[misc]
    assert dataclasses.replace(hb, host="h2").host == "h2"
    ev = ReplicaEvent("d", "r", "h", ReplicaState.READY, 2.0, gpu_uuids=["g"])
    assert ev.tier is None and ev.gpu_uuids == ["g"] and ev.reason == ""


def test_refuses_what_it_cannot_copy() -> None:
    @dataclass(frozen=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            pass

    with pytest.raises(TypeError, match="__post_init__"):
        quick_init(Post)
