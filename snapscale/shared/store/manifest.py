"""The signed checkpoint manifest: what files an image holds and which chunks rebuild them.

Pure: build, sign (HMAC-SHA256 over `wire.canonical` bytes), encode, and load-with-refusal.
Loading never trusts a byte it has not checked; each refusal is a `ManifestError` subclass.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath
from dataclasses import dataclass, field
from typing import Any

import orjson

from snapscale.shared.core import wire
from snapscale.shared.core.errors import MessageError, SnapscaleError
from snapscale.shared.store.chunking import ZERO_CHUNK, chunk_count, chunk_length, is_digest

FORMAT_VERSION = 1
# A checkpoint whose weights are outside the image (docs/weights.md): its manifest lists their
# chunks too. A reader that only knows version 1 refuses it (and boots cold) instead of restoring
# an image whose weights it would not bring.
WEIGHTS_FORMAT_VERSION = 2
READS = (FORMAT_VERSION, WEIGHTS_FORMAT_VERSION)
SIGNATURE_SCHEME = "hmac-sha256"


class ManifestError(SnapscaleError):
    """A manifest was refused. `reason` says why; a restorer refetches once, then boots cold."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"manifest refused: {reason}")
        self.reason = reason


class SignatureError(ManifestError):
    """Missing or wrong signature: the manifest was not written by a holder of the cluster key."""


class FormatVersionError(ManifestError):
    """A format version this build does not speak."""


class PathError(ManifestError):
    """A file path that is absolute, escapes the image directory, or repeats another."""


class ChunkListError(ManifestError):
    """A file's chunk list does not fit its size, or names something that is not a digest."""


class SchemaError(ManifestError):
    """Not JSON, or a field is missing or of the wrong type."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated, normalized
    size: int
    mode: int  # permission bits (0o7777 at most); every entry is a regular file
    chunks: list[str]  # sha256 hex digests or "zero", one per chunk_bytes of the file


@dataclass(frozen=True)
class WeightChunk:
    """A chunk of the weights kept outside the image (the image's weights record says where)."""

    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    format_version: int
    checkpoint_id: str
    deployment: str
    compat: dict[str, str]
    compat_hash: str
    chunk_bytes: int
    files: list[FileEntry]
    total_bytes: int  # sum of file sizes
    unique_bytes: int  # bytes of distinct non-zero chunks
    new_bytes: int  # bytes this checkpoint uploaded (the rest the store already had)
    zero_bytes: int  # bytes recorded as zero chunks, never stored
    created_at: float
    timings_s: dict[str, float] = field(default_factory=dict)
    weights: list[WeightChunk] = field(default_factory=list)  # distinct; format 2 only

    def digests(self) -> set[str]:
        """Distinct non-zero chunk digests, the weights' included."""
        return {c for f in self.files for c in f.chunks if c != ZERO_CHUNK} | self.weight_digests()

    def weight_digests(self) -> set[str]:
        return {w.digest for w in self.weights}

    @property
    def weight_bytes(self) -> int:
        return sum(w.size for w in self.weights)

    def chunk_sizes(self) -> dict[str, int]:
        """Each distinct non-zero chunk's length in bytes, the weights' included."""
        out: dict[str, int] = {}
        for f in self.files:
            for i, c in enumerate(f.chunks):
                if c != ZERO_CHUNK:
                    out.setdefault(c, chunk_length(f.size, self.chunk_bytes, i))
        for w in self.weights:
            out.setdefault(w.digest, w.size)
        return out


def plain(m: Manifest) -> dict[str, Any]:
    """The signed form: without weights a manifest reads exactly as before they existed."""
    d: dict[str, Any] = wire.to_plain(m)
    if not m.weights:
        del d["weights"]
    return d


def sign(body: bytes, key: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def encode_manifest(m: Manifest, key: bytes) -> bytes:
    """Signed manifest bytes: {"manifest": ..., "signature": {"scheme", "hmac"}}."""
    if not key:
        raise SignatureError("no signing key: set SNAPSCALE_SIGNING_KEY")
    check_manifest(m)
    body = orjson.dumps(plain(m), option=orjson.OPT_SORT_KEYS)
    doc = {"manifest": orjson.loads(body), "signature": {"scheme": SIGNATURE_SCHEME, "hmac": sign(body, key)}}
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def load_manifest(data: bytes, signing_key: bytes) -> Manifest:
    """Verify and decode signed manifest bytes, or raise the `ManifestError` that says why not."""
    if not signing_key:
        raise SignatureError("no signing key configured: cannot verify (set SNAPSCALE_SIGNING_KEY)")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise SchemaError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), dict):
        raise SchemaError("no 'manifest' object")
    sig = doc.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("hmac"), str):
        raise SignatureError("missing signature")
    if sig.get("scheme") != SIGNATURE_SCHEME:
        raise SignatureError(f"unknown signature scheme {sig.get('scheme')!r}")
    raw: dict[str, Any] = doc["manifest"]
    # The HMAC covers the canonical form of what was parsed, so whitespace or key order do not
    # matter but every value does.
    body = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
    if not hmac.compare_digest(sign(body, signing_key), sig["hmac"]):
        raise SignatureError("signature does not match (tampered, or signed with another key)")
    version = raw.get("format_version")
    if version not in READS:
        raise FormatVersionError(f"unknown format version {version!r} (this build reads {list(READS)})")
    try:
        m = wire.from_plain(Manifest, raw, "manifest")
    except MessageError as e:
        raise SchemaError(f"{e.field}: {e.reason}") from None
    check_manifest(m)
    return m


def check_path(path: str) -> None:
    if not path:
        raise PathError("empty path")
    if path.startswith("/"):
        raise PathError(f"{path!r} is absolute")
    if "\\" in path or "\0" in path:
        raise PathError(f"{path!r} holds a backslash or NUL")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(path) != path:
        raise PathError(f"{path!r} is not a plain relative path (escapes the image dir or is not normalized)")


def check_manifest(m: Manifest) -> None:
    """Structural checks that make a manifest safe to materialize; raises a `ManifestError`."""
    if m.format_version not in READS:
        raise FormatVersionError(f"unknown format version {m.format_version!r}")
    if (m.format_version == WEIGHTS_FORMAT_VERSION) != bool(m.weights):
        raise FormatVersionError(
            f"format version {m.format_version} with {len(m.weights)} weight chunks: weights go with "
            f"version {WEIGHTS_FORMAT_VERSION}, and only with it"
        )
    seen_w: set[str] = set()
    for w in m.weights:
        if not is_digest(w.digest) or w.digest in seen_w:
            raise ChunkListError(f"weights: {w.digest!r} is not a sha256 digest or is listed twice")
        if w.size <= 0:
            raise ChunkListError(f"weights: chunk {w.digest[:16]} has size {w.size}")
        seen_w.add(w.digest)
    if m.chunk_bytes <= 0:
        raise ChunkListError(f"chunk_bytes must be positive, got {m.chunk_bytes}")
    seen: set[str] = set()
    dirs: set[str] = set()
    total = 0
    for f in m.files:
        check_path(f.path)
        if f.path in seen:
            raise PathError(f"{f.path!r} listed twice")
        seen.add(f.path)
        parent = posixpath.dirname(f.path)
        while parent:
            dirs.add(parent)
            parent = posixpath.dirname(parent)
        if f.mode < 0 or f.mode > 0o7777:
            raise PathError(f"{f.path!r}: mode {f.mode:o} is not plain permission bits (no links or devices)")
        if f.size < 0:
            raise ChunkListError(f"{f.path!r}: negative size {f.size}")
        want = chunk_count(f.size, m.chunk_bytes)
        if len(f.chunks) != want:
            raise ChunkListError(
                f"{f.path!r}: {len(f.chunks)} chunks for {f.size} bytes "
                f"(chunk_bytes {m.chunk_bytes}), want {want}"
            )
        for c in f.chunks:
            if c != ZERO_CHUNK and not is_digest(c):
                raise ChunkListError(f"{f.path!r}: {c!r} is not a sha256 digest")
        total += f.size
    clash = seen & dirs
    if clash:
        raise PathError(f"{sorted(clash)[0]!r} is both a file and a directory")
    if total != m.total_bytes:
        raise ChunkListError(f"total_bytes {m.total_bytes} but files add up to {total}")
