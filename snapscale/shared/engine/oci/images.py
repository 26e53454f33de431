"""The host's content-addressed image store: `<state dir>/images/<manifest digest hex>/`.

An image named by a spec (`oci:<layout>@sha256:…`, `docker-archive:<path>`, `docker://<ref>@sha256:…`)
is copied once with skopeo as published (its manifest checked against the digest the spec names),
converted into an OCI layout of its own (`layout/`, tag `img`), and unpacked once with umoci
(`bundle/rootfs`): the read-only lower layer of
every replica's overlay. Copies and unpacks are serialised per host (flock); a half-made one never
takes the final name. Parsing is pure; `ImageStore.ensure` is the edge.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapscale.shared.engine.errors import EngineError
from snapscale.shared.engine.oci import runc

DEFAULT_ROOT = Path("/var/lib/snapscale/images")
_REF = re.compile(
    r"^(?:oci:(?P<layout>/[^@]+)@(?P<d1>sha256:[0-9a-f]{64})|docker-archive:(?P<archive>/.+)|"
    r"docker://(?P<ref>[^@\s]+)@(?P<d2>sha256:[0-9a-f]{64}))$"
)
TAG = "img"


@dataclass(frozen=True)
class ImageRef:
    transport: str  # "oci", "docker-archive" or "docker"
    location: str  # the layout dir, the archive's path, or the registry reference
    digest: str | None  # the manifest digest the spec names (None for a docker-archive)


@dataclass(frozen=True)
class Image:
    digest: str
    rootfs: Path  # unpacked, shared, read-only by convention: replicas write to their own overlay


def parse_ref(ref: str) -> ImageRef:
    """Pure. The spec's door (bus/sandbox_spec.py) has checked the shape already."""
    m = _REF.match(ref)
    if not m:
        raise EngineError("image", f"not an image reference by digest: {ref[:80]!r}")
    if m.group("layout"):
        return ImageRef("oci", m.group("layout"), m.group("d1"))
    if m.group("archive"):
        return ImageRef("docker-archive", m.group("archive"), None)
    return ImageRef("docker", m.group("ref"), m.group("d2"))


def oci_tag(index: dict[str, Any], digest: str) -> str:
    """The tag skopeo 1.9 needs to read the manifest `digest` from an OCI layout's index. Pure."""
    for m in index.get("manifests", []):
        if m.get("digest") == digest:
            tag = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            if tag:
                return str(tag)
            raise EngineError("image", f"manifest {digest} has no ref.name in the layout's index")
    raise EngineError("image", f"the layout holds no manifest {digest}")


def source_argv(ref: ImageRef) -> str:
    """skopeo's source name for `ref`. Reads an OCI layout's index (to find its tag)."""
    if ref.transport == "oci":
        assert ref.digest is not None
        try:
            index = json.loads((Path(ref.location) / "index.json").read_text())
        except (OSError, ValueError) as e:
            raise EngineError("image", f"no OCI layout at {ref.location}: {e}") from None
        return f"oci:{ref.location}:{oci_tag(index, ref.digest)}"
    if ref.transport == "docker-archive":
        return f"docker-archive:{ref.location}"
    return f"docker://{ref.location}@{ref.digest}"


async def _skopeo(*args: str) -> None:
    await runc.tool("skopeo", "--insecure-policy", "copy", "--quiet", *args, step="image")


def _file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class ImageStore:
    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def cached(self, digest: str) -> Image | None:
        rootfs = self.path(digest) / "bundle" / "rootfs"
        return Image(digest, rootfs) if rootfs.is_dir() else None

    async def ensure(self, ref_text: str) -> Image:
        """The image unpacked on this host: from the store, else copied and unpacked now."""
        ref = parse_ref(ref_text)
        if ref.digest and (hit := self.cached(ref.digest)):
            return hit
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
            if ref.digest and (hit := self.cached(ref.digest)):
                return hit
            return await self._fetch(ref)
        finally:
            os.close(lock_fd)  # releases the flock

    async def _fetch(self, ref: ImageRef) -> Image:
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.root))
        try:
            # As published first (`dir:` keeps the manifest's bytes: its digest is checked), then as
            # an OCI layout for umoci, which unpacks no Docker manifest. No trust policy file is
            # needed (a bare GPU host has none): the image is pinned by its digest, checked here, or
            # is a local archive the operator named.
            src, layout = tmp / "published", tmp / "layout"
            await _skopeo("--preserve-digests", source_argv(ref), f"dir:{src}")
            digest = await asyncio.to_thread(_file_digest, src / "manifest.json")
            if ref.digest and digest != ref.digest:
                raise EngineError(
                    "image", f"{ref.location} gave manifest {digest}, the spec names {ref.digest}"
                )
            if hit := self.cached(digest):
                return hit  # a docker-archive already in the store
            await _skopeo("--format", "oci", f"dir:{src}", f"oci:{layout}:{TAG}")
            await runc.tool(
                "umoci", "unpack", "--image", f"{layout}:{TAG}", str(tmp / "bundle"), step="image"
            )
            shutil.rmtree(src)
            os.rename(tmp, self.path(digest))
            return Image(digest, self.path(digest) / "bundle" / "rootfs")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
