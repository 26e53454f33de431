"""A small OCI image built here with umoci (no registry needed): its own /etc (passwd, group, no
shadow), usrmerge links into /usr (which a spec mounts read-only from the host for an interpreter),
a world-writable /tmp and /data, and the files given under /app. Used by bench/oci_sandbox.py and
the sandbox tests (tests/oci_image.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path


def build_layout(root: Path, app: dict[str, str] | None = None, *, ld_cache: bool = False) -> str:
    """An OCI layout under `root` holding one image; its `oci:<layout>@<digest>` reference.

    `ld_cache`: the image gets this host's /etc/ld.so.cache, right for it since its /usr is the
    host's, mounted: what the NVIDIA toolkit's ldconfig hook gives a container, so that tools which
    look libcuda up with `ldconfig -p` (triton, under torch.compile) find the driver's libraries."""
    layout, bundle = root / "layout", root / "unpacked"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:app"], check=True)
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:app", str(bundle)], check=True, capture_output=True
    )
    fs = bundle / "rootfs"
    for name in ("bin", "lib", "lib64", "sbin"):
        (fs / name).symlink_to(f"usr/{name}")
    for d in ("etc", "usr", "app", "data", "tmp"):
        (fs / d).mkdir(exist_ok=True)
    (fs / "tmp").chmod(0o1777)
    (fs / "data").chmod(0o777)
    (fs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n")
    (fs / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    if ld_cache:
        shutil.copyfile("/etc/ld.so.cache", fs / "etc" / "ld.so.cache")
    for name, text in (app or {}).items():
        (fs / "app" / name).write_text(text)
    subprocess.run(["umoci", "repack", "--image", f"{layout}:app", str(bundle)], check=True)
    index = json.loads((layout / "index.json").read_text())
    return f"oci:{layout}@{index['manifests'][0]['digest']}"
