"""The compatibility key: stable canonical hash, a field-by-field diff, this host read as a CPU host."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from snapscale.shared.bus.spec import DeploymentSpec
from snapscale.shared.engine import compat
from snapscale.shared.engine.compat import CompatKey, diff, host_key
from snapscale.shared.engine.criu import CriuBinary


def key(**kw: str) -> CompatKey:
    base = dict(
        gpu_model="NVIDIA H100 80GB HBM3",
        gpu_count="1",
        driver_version="580.159.04",
        cuda_driver_version="13000",
        criu_version="4.2.1",
        kernel_release="6.18.44",
        runtime_fingerprint="f" * 64,
        spec_hash="s" * 64,
    )
    base.update(kw)
    return CompatKey(**base)


def test_hash_is_canonical_and_sensitive() -> None:
    k = key()
    assert k.hash() == key().hash()
    assert json.loads(k.canonical()) == k.as_dict()
    assert list(json.loads(k.canonical())) == sorted(k.as_dict())
    assert k.as_dict()["format_version"] == compat.FORMAT_VERSION
    assert key(driver_version="580.0").hash() != k.hash()
    assert CompatKey.from_dict(k.as_dict()) == k


def test_diff_names_each_differing_field() -> None:
    a = key()
    b = key(gpu_model="NVIDIA H200", criu_version="4.1.1")
    assert diff(a, b) == ["criu_version: 4.2.1 -> 4.1.1", "gpu_model: NVIDIA H100 80GB HBM3 -> NVIDIA H200"]
    assert diff(a, a) == []
    # A manifest's key from an older snapscale may lack a field: that is a difference too.
    old = a.as_dict()
    del old["format_version"]
    assert diff(old, a) == ["format_version: <none> -> 1"]


def test_host_key_on_this_cpu_host(criu: CriuBinary, tmp_path: Path) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 1000)
    spec = DeploymentSpec(name="d", command=[sys.executable, "-c", "pass"], image=[str(weights)])
    k = host_key(spec, criu=criu, gpu_count=0)
    assert k.gpu_model == "cpu" and k.gpu_count == "0" and k.cuda_driver_version == "none"
    assert k.criu_version == criu.version and k.kernel_release == os.uname().release
    assert k.spec_hash == spec.spec_hash()
    assert host_key(spec, criu=criu, gpu_count=0) == k  # deterministic
    # Changing what the deployment names as its image changes the runtime fingerprint.
    weights.write_bytes(b"y" * 1000)
    k2 = host_key(spec, criu=criu, gpu_count=0)
    assert diff(k, k2) == [f"runtime_fingerprint: {k.runtime_fingerprint} -> {k2.runtime_fingerprint}"]
    # A different spec is a different key, named as such.
    k3 = host_key(replace(spec, env={"A": "1"}), criu=criu, gpu_count=0)
    assert [d.split(":")[0] for d in diff(k2, k3)] == ["spec_hash"]


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU host: NVML answers")
def test_no_nvml_reads_as_cpu() -> None:
    g = compat.read_gpus()
    assert (g.model, g.count, g.driver) == ("cpu", 0, "none")


def test_big_files_are_fingerprinted_by_size_and_edges(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(compat._FULL_HASH_BYTES + 10)
    d1 = compat.file_digest(big)
    with open(big, "r+b") as f:
        f.seek(5)
        f.write(b"head changed")
    assert compat.file_digest(big) != d1


def test_bytecode_written_by_a_boot_does_not_change_the_runtime_fingerprint(tmp_path: Path) -> None:
    """A fresh checkout has no __pycache__: the first cold boot writes it. The key the restorer took
    before that boot must match the one the freezer takes after it (a fresh-clone CI run fell back
    to cold boots on 'compat mismatch: runtime_fingerprint' until this held)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "server.py").write_text("print('hi')\n")
    spec = DeploymentSpec(name="d", command=[sys.executable], cwd=str(tmp_path), image=["app"])
    before = compat.runtime_fingerprint(spec)
    (app / "__pycache__").mkdir()
    (app / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (app / "stray.pyc").write_bytes(b"\x00")
    assert compat.runtime_fingerprint(spec) == before
    (app / "server.py").write_text("print('changed')\n")
    assert compat.runtime_fingerprint(spec) != before
