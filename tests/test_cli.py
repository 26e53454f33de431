"""The installed `snapscale` console script answers --help and lists its subcommands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_help_from_the_venv() -> None:
    exe = Path(sys.executable).parent / "snapscale"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True, timeout=60)
    assert "usage: snapscale" in out.stdout
    assert "deploy" in out.stdout


def test_bad_spec_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ncommand = []\n')
    out = subprocess.run(
        [sys.executable, "-m", "snapscale", "deploy", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "command: is empty" in out.stderr
