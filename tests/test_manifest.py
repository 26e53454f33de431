"""Signed manifests: round trip, and every refusal (tampering anywhere, missing signature, wrong
key, escaping or absolute paths, inconsistent chunk lists, unknown format version) is typed."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import orjson
import pytest

from snapscale.shared.store import manifest as mf
from snapscale.shared.store.chunking import ZERO_CHUNK
from snapscale.shared.store.manifest import FileEntry, Manifest, load_manifest

KEY = b"k" * 32
D1 = hashlib.sha256(b"1").hexdigest()
D2 = hashlib.sha256(b"2").hexdigest()


def sample() -> Manifest:
    return Manifest(
        format_version=mf.FORMAT_VERSION,
        checkpoint_id="c1",
        deployment="llama",
        compat={"gpu": "H100", "criu": "4.2.1"},
        compat_hash="abc",
        chunk_bytes=100,
        files=[
            FileEntry("pages-1.img", 250, 0o644, [D1, ZERO_CHUNK, D2]),
            FileEntry("d/core.img", 5, 0o600, [D2]),
        ],
        total_bytes=255,
        unique_bytes=150,
        new_bytes=150,
        zero_bytes=100,
        created_at=1764290000.25,
        timings_s={"dump": 1.5},
    )


def resign(raw: dict[str, Any], key: bytes = KEY) -> bytes:
    """What an attacker holding the key (or a buggy writer) could produce: signed, unchecked."""
    body = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
    return orjson.dumps({"manifest": raw, "signature": {"scheme": "hmac-sha256", "hmac": mf.sign(body, key)}})


def raw_of(m: Manifest) -> dict[str, Any]:
    return dict(orjson.loads(mf.encode_manifest(m, KEY))["manifest"])


def test_round_trip() -> None:
    m = sample()
    assert load_manifest(mf.encode_manifest(m, KEY), KEY) == m
    assert m.digests() == {D1, D2}
    assert m.chunk_sizes() == {D1: 100, D2: 50}


def test_every_single_byte_change_is_refused() -> None:
    data = mf.encode_manifest(sample(), KEY)
    for i in range(len(data)):
        for flip in (0x01, 0x20):
            bad = bytearray(data)
            bad[i] ^= flip
            with pytest.raises(mf.ManifestError):
                load_manifest(bytes(bad), KEY)


def test_missing_or_wrong_signature() -> None:
    data = mf.encode_manifest(sample(), KEY)
    doc = orjson.loads(data)
    with pytest.raises(mf.SignatureError, match="missing"):
        load_manifest(orjson.dumps({"manifest": doc["manifest"]}), KEY)
    with pytest.raises(mf.SignatureError, match="does not match"):
        load_manifest(data, b"other key")
    with pytest.raises(mf.SignatureError, match="no signing key"):
        load_manifest(data, b"")
    with pytest.raises(mf.SignatureError):
        mf.encode_manifest(sample(), b"")


@pytest.mark.parametrize(
    "path", ["../../etc/x", "/etc/passwd", "a/../../x", "a//b", "./a", "a/.", "", "a\\..\\b", "x/.."]
)
def test_escaping_paths_are_refused_even_when_signed(path: str) -> None:
    raw = raw_of(sample())
    raw["files"][0]["path"] = path
    with pytest.raises(mf.PathError):
        load_manifest(resign(raw), KEY)


def test_unsigned_path_tamper_is_a_signature_error() -> None:
    data = mf.encode_manifest(sample(), KEY).replace(b'"pages-1.img"', b'"../../etc/x"')
    with pytest.raises(mf.SignatureError):
        load_manifest(data, KEY)


def test_duplicate_paths_and_file_dir_clash() -> None:
    raw = raw_of(sample())
    raw["files"][1]["path"] = "pages-1.img"
    with pytest.raises(mf.PathError, match="twice"):
        load_manifest(resign(raw), KEY)
    raw = raw_of(sample())
    raw["files"][1]["path"] = "pages-1.img/core.img"
    with pytest.raises(mf.PathError, match="both a file and a directory"):
        load_manifest(resign(raw), KEY)


def test_symlink_or_device_mode_is_refused() -> None:
    raw = raw_of(sample())
    raw["files"][0]["mode"] = 0o120777  # S_IFLNK
    with pytest.raises(mf.PathError, match="permission bits"):
        load_manifest(resign(raw), KEY)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r["files"][0].update(size=301), "want 4"),
        (lambda r: r["files"][0]["chunks"].pop(), "want 3"),
        (lambda r: r["files"][0]["chunks"].__setitem__(0, "nothex"), "not a sha256"),
        (lambda r: r.update(total_bytes=1), "add up"),
        (lambda r: r.update(chunk_bytes=0), "positive"),
    ],
)
def test_inconsistent_chunk_lists(edit: Any, match: str) -> None:
    raw = raw_of(sample())
    edit(raw)
    with pytest.raises(mf.ChunkListError, match=match):
        load_manifest(resign(raw), KEY)


def test_unknown_format_version() -> None:
    raw = raw_of(sample())
    raw["format_version"] = 99
    with pytest.raises(mf.FormatVersionError, match="99"):
        load_manifest(resign(raw), KEY)


def test_schema_errors_name_the_field() -> None:
    raw = raw_of(sample())
    del raw["deployment"]
    with pytest.raises(mf.SchemaError, match="deployment"):
        load_manifest(resign(raw), KEY)
    with pytest.raises(mf.SchemaError, match="not JSON"):
        load_manifest(b"{nope", KEY)


def test_writer_refuses_to_sign_a_bad_manifest() -> None:
    bad = replace(sample(), files=[FileEntry("../x", 1, 0o644, [D1])], total_bytes=1)
    with pytest.raises(mf.PathError):
        mf.encode_manifest(bad, KEY)
