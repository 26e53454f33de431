"""The simulator compiled with mypyc (snapscale/simulate/native.py): the same results as the
interpreted one, loaded only while its build matches the sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapscale.simulate import native

# every policy on a crowded fleet with yesterday's checkpoints (resumes, host cache, store, cold
# boots, prefetches, queueing for GPUs), and the freezing ones on the first day (freezes)
RUN = """
import json, sys
from dataclasses import fields
from pathlib import Path
from snapscale.simulate import native
ran = native.activate(Path(sys.argv[1]))
from snapscale.scaler.config import ScalerConfig
from snapscale.simulate import engine
from snapscale.simulate.engine import Sim
from snapscale.simulate.policies import POLICIES
from snapscale.simulate.profile import Profile
from snapscale.simulate.samples import samples
from snapscale.simulate.trace import GenSpec, generate
tr = generate(GenSpec(deployments=80, requests=6000, horizon_s=2 * 3600.0, seed=3))
per = [samples(tr, d) for d in range(len(tr.names))]
out = {}
cfg = ScalerConfig(tick_s=2.5)
runs = [(p, True) for p in POLICIES] + [(p, False) for p in POLICIES if p.freeze]
for p, ckpt in runs:
    r = Sim(tr, per, p, Profile(), hosts=3, gpus_per_host=4, sampled=(0, 5), cfg=cfg, checkpoints=ckpt).run()
    doc = {f.name: getattr(r, f.name) for f in fields(r) if f.name != "wall_s"}
    doc["waits"], doc["restores"] = list(r.waits), dict(r.restores)
    out[f"{p.name} {ckpt}"] = doc
print(json.dumps({"ran": ran, "engine": engine.__file__, "results": out}))
"""


def _run(build: Path, *, interpreted: bool = False) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != native.INTERPRETED_ENV}
    if interpreted:
        env[native.INTERPRETED_ENV] = "1"
    p = subprocess.run([sys.executable, "-c", RUN, str(build)], capture_output=True, text=True, env=env,
                       timeout=600, check=True)  # fmt: skip
    doc: dict[str, object] = json.loads(p.stdout)
    return doc


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's build where it is current (`make setup` made it), else one made here."""
    if native.stale() is None:
        return native.NATIVE_DIR
    into = tmp_path_factory.mktemp("native") / "build"
    native.build(into)
    return into


def test_the_compiled_simulator_gives_the_interpreted_ones_results(build: Path) -> None:
    fast, slow = _run(build), _run(build, interpreted=True)
    assert str(fast["ran"]).startswith("compiled") and str(fast["engine"]).endswith(".so"), fast["ran"]
    assert str(slow["ran"]).startswith("interpreted") and str(slow["engine"]).endswith(".py")
    assert fast["results"] == slow["results"]
    results = slow["results"]
    assert isinstance(results, dict)
    seen = {tier for r in results.values() for tier, n in r["restores"].items() if n}
    assert seen == {"resume", "hot", "cache", "store", "cold"}, seen
    assert all(r["freezes"] for name, r in results.items() if name.endswith("False"))
    assert results["tiers-prefetch True"]["prefetches"] and results["tiers True"]["timeouts"]


def test_a_build_is_loaded_only_while_it_matches_the_sources(build: Path, tmp_path: Path) -> None:
    assert native.stale(build) is None
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in build.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    stamp = json.loads((copy / native.STAMP).read_text())
    (copy / native.STAMP).write_text(json.dumps({**stamp, "sources": "0" * 64}))
    assert native.stale(copy) == "the sources changed since the build"
    ran = _run(copy)
    assert ran["ran"] == (
        "interpreted (the sources changed since the build; `python -m snapscale.simulate.native build` "
        "makes it ~1.2x faster)"
    )
    assert str(ran["engine"]).endswith(".py")
    (copy / native.STAMP).write_text(json.dumps({**stamp, "version": "2.7.18"}))
    assert "built for Python '2.7.18'" in str(native.stale(copy))
    assert native.stale(tmp_path / "none") == f"no build in {tmp_path / 'none'}"


def test_check_answers_whether_the_build_is_current(build: Path, tmp_path: Path) -> None:
    assert native.main(["check", "--into", str(build)]) == 0
    assert native.main(["check", "--into", str(tmp_path)]) == 1
