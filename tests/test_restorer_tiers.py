"""Table tests of the restorer's tier decision: fastest tier first, every skipped tier explained."""

from __future__ import annotations

from dataclasses import replace

import pytest

from snapscale.restorer.tiers import (
    Candidate,
    NoTierError,
    Observed,
    TierChoice,
    choose,
    compat_diff,
    pick_suspended,
)
from snapscale.shared.bus.messages import Tier

HOST = {"gpu_model": "cpu", "driver": "none", "criu_version": "4.2.1", "kernel": "6.18", "spec_hash": "s1"}
HOST_HASH = "a" * 64
OTHER = {**HOST, "driver": "580", "criu_version": "4.1.1"}
ALL = frozenset(Tier)

BASE = Observed(replica="r1", allow=ALL, host_compat_hash=HOST_HASH, host_compat=HOST)
ENTRY = Candidate("ck1", HOST_HASH, HOST, created_at=1.0)
OLD_OTHER = Candidate("ck0", "b" * 64, OTHER, created_at=0.5)
NEW_OTHER = Candidate("ck2", "c" * 64, {**HOST, "kernel": "6.1"}, created_at=2.0)

CASES: list[tuple[str, Observed, TierChoice]] = [
    (
        "nothing at all: cold",
        BASE,
        TierChoice(Tier.COLD, f"no suspended replica; no checkpoint for key {'a' * 12}"),
    ),
    (
        "suspended replica of the deployment: resume it",
        replace(BASE, suspended=("r0", "r1")),
        TierChoice(Tier.RESUME, "", resume_replica="r1"),
    ),
    (
        "another suspended replica: resume the first",
        replace(BASE, suspended=("r7", "r8")),
        TierChoice(Tier.RESUME, "", resume_replica="r7"),
    ),
    (
        "entry fully cached",
        replace(BASE, entry=ENTRY, need_bytes=100, cached_bytes=100),
        TierChoice(Tier.CACHE, "no suspended replica", checkpoint_id="ck1"),
    ),
    (
        "entry with nothing to fetch (all-zero image) counts as cached",
        replace(BASE, entry=ENTRY, need_bytes=0),
        TierChoice(Tier.CACHE, "no suspended replica", checkpoint_id="ck1"),
    ),
    (
        "entry partly cached: prefetch",
        replace(BASE, entry=ENTRY, need_bytes=4_000_000, cached_bytes=1_000_000),
        TierChoice(
            Tier.STORE,
            "no suspended replica; not in host cache (1.0 MB of 4.0 MB cached)",
            checkpoint_id="ck1",
        ),
    ),
    (
        "only a checkpoint under another key: mismatch lists the fields",
        replace(BASE, others=(OLD_OTHER,)),
        TierChoice(
            Tier.COLD,
            f"no suspended replica; no checkpoint for key {'a' * 12}; "
            "compat mismatch with checkpoint ck0: criu_version, driver",
        ),
    ),
    (
        "several other keys: the newest explains",
        replace(BASE, others=(OLD_OTHER, NEW_OTHER)),
        TierChoice(
            Tier.COLD,
            f"no suspended replica; no checkpoint for key {'a' * 12}; "
            "compat mismatch with checkpoint ck2: kernel",
        ),
    ),
    (
        "other key whose manifest is unreadable: the hashes are named",
        replace(BASE, others=(replace(OLD_OTHER, compat=None),)),
        TierChoice(
            Tier.COLD,
            f"no suspended replica; no checkpoint for key {'a' * 12}; compat mismatch with checkpoint ck0: "
            f"key {'b' * 12} != host {'a' * 12} (its manifest could not be read)",
        ),
    ),
    (
        "manifest refused",
        replace(BASE, entry=ENTRY, manifest_error="manifest signature invalid"),
        TierChoice(Tier.COLD, "no suspended replica; checkpoint ck1: manifest signature invalid"),
    ),
    (
        "pinned checkpoint under another key",
        replace(BASE, pinned="ck0", others=(OLD_OTHER,)),
        TierChoice(
            Tier.COLD, "no suspended replica; compat mismatch with checkpoint ck0: criu_version, driver"
        ),
    ),
    (
        "pinned checkpoint unknown",
        replace(BASE, pinned="ck9", entry=ENTRY),
        TierChoice(Tier.COLD, "no suspended replica; pinned checkpoint ck9 not in the catalog"),
    ),
    (
        "pinned checkpoint is the entry",
        replace(BASE, pinned="ck1", entry=ENTRY, need_bytes=10, cached_bytes=10),
        TierChoice(Tier.CACHE, "no suspended replica", checkpoint_id="ck1"),
    ),
    (
        "resume failed: restore next, with the resume failure first",
        replace(
            BASE,
            suspended=("r1",),
            entry=ENTRY,
            need_bytes=1,
            cached_bytes=1,
            tried=frozenset({Tier.RESUME}),
            earlier=("resume failed: cuda_restore: CUDA_ERROR_X",),
        ),
        TierChoice(Tier.CACHE, "resume failed: cuda_restore: CUDA_ERROR_X", checkpoint_id="ck1"),
    ),
    (
        "restore failed: cold",
        replace(
            BASE,
            entry=ENTRY,
            tried=frozenset({Tier.STORE}),
            earlier=("no suspended replica", "restore failed: criu_restore: bad image"),
        ),
        TierChoice(Tier.COLD, "no suspended replica; restore failed: criu_restore: bad image"),
    ),
    (
        "resume not allowed",
        replace(BASE, allow=frozenset({Tier.COLD, Tier.STORE}), suspended=("r1",)),
        TierChoice(
            Tier.COLD,
            f"resume not allowed by the command; no checkpoint for key {'a' * 12}",
        ),
    ),
    (
        "cached but cache not allowed: prefetch tier",
        replace(BASE, allow=frozenset({Tier.STORE, Tier.COLD}), entry=ENTRY),
        TierChoice(
            Tier.STORE,
            "resume not allowed by the command; cache not allowed by the command",
            checkpoint_id="ck1",
        ),
    ),
    (
        "only cold allowed",
        replace(BASE, allow=frozenset({Tier.COLD}), entry=ENTRY),
        TierChoice(Tier.COLD, "resume not allowed by the command; restore not allowed by the command"),
    ),
    (
        "uncached and prefetch not allowed",
        replace(BASE, allow=frozenset({Tier.CACHE, Tier.COLD}), entry=ENTRY, need_bytes=5),
        TierChoice(
            Tier.COLD,
            "resume not allowed by the command; not in host cache (0.0 MB of 0.0 MB cached); "
            "store not allowed by the command",
        ),
    ),
]


@pytest.mark.parametrize(("name", "observed", "expected"), CASES, ids=[c[0] for c in CASES])
def test_choose(name: str, observed: Observed, expected: TierChoice) -> None:
    assert choose(observed) == expected


def test_no_tier_left_names_every_reason() -> None:
    o = replace(BASE, allow=frozenset({Tier.STORE}))
    with pytest.raises(NoTierError, match=r"no checkpoint for key .*; cold boot not allowed by the command"):
        choose(o)


@pytest.mark.parametrize(
    ("a", "b", "fields"),
    [
        ({}, {}, []),
        ({"x": "1"}, {"x": "1"}, []),
        ({"x": "1", "y": "2"}, {"x": "1", "y": "3"}, ["y"]),
        ({"x": "1"}, {"z": "1"}, ["x", "z"]),
    ],
)
def test_compat_diff(a: dict[str, str], b: dict[str, str], fields: list[str]) -> None:
    assert compat_diff(a, b) == fields


def test_pick_suspended_prefers_the_replica_itself() -> None:
    assert pick_suspended("r2", ["r1", "r2"]) == "r2"
    assert pick_suspended("r3", ["r1", "r2"]) == "r1"
    assert pick_suspended("r3", []) is None
