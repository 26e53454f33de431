"""One path per file: the code lives in snapscale/, the folders the users asked for link into it, and a
wheel and an sdist built from the repository hold every module (nothing lives only behind a link)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_user_folders_link_into_the_package() -> None:
    for name in ("scaler", "restorer", "freezer", "gateway"):
        link = ROOT / "services" / name
        assert link.is_symlink() and link.resolve() == ROOT / "snapscale" / name
    assert (ROOT / "shared").is_symlink() and (ROOT / "shared").resolve() == ROOT / "snapscale" / "shared"
    # and nothing under snapscale/ is a link: the import path is the file path for every tool
    assert not [p for p in (ROOT / "snapscale").rglob("*") if p.is_symlink()]


def test_wheel_and_sdist_contain_every_module(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "dist"
    for rel in _tracked():  # a clean copy of what git tracks: no build leftovers, no venv
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        p = ROOT / rel
        if p.is_symlink():
            dst.symlink_to(p.readlink())
        elif p.is_file():
            dst.write_bytes(p.read_bytes())
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between them
        code = f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])"
        r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    modules = {rel for rel in _tracked() if rel.startswith("snapscale/") and rel.endswith(".py")}
    assert len(modules) > 80, "the package's modules were not found"
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert sorted(modules - in_wheel) == []
    assert sorted(modules - in_sdist) == []
    # one copy of each: the links to it are not packaged as a second tree
    assert not [n for n in in_wheel if n.startswith(("services/", "shared/"))]
