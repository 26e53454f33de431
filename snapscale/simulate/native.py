"""The simulator's hot modules compiled with mypyc: the same source, run as C, ~1.2x faster.

`snapscale simulate` spends its time in the event loop and the fleet's bookkeeping (`COMPILED`)
and in the services' own functions, which stay interpreted: only the simulator is compiled, so it
still calls the very functions the services call. `build` compiles `COMPILED` into `NATIVE_DIR`
(ignored by git) with a stamp of the sources it was built from; `activate` puts that folder first
on the package's path only while the stamp still matches every source of the `snapscale` package,
so an edit anywhere makes the simulator interpreted again (it says so) until the next build, and
never runs stale code. tests/test_simulate_native.py checks both builds give the same results.

Build: `.venv/bin/python -m snapscale.simulate.native build` (`make setup` runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

COMPILED = ("state", "fleet", "down", "engine")  # the modules `build` compiles
PACKAGE = Path(__file__).resolve().parent
NATIVE_DIR = PACKAGE / "_native"
STAMP = "stamp.json"
GROUP = "snapscale.simulate._native_group"  # the compiled modules' shared library
INTERPRETED_ENV = "SNAPSCALE_SIM_INTERPRETED"  # set (to anything): never load the build


def stamp() -> dict[str, str]:
    """What a build is valid for: every source of the package (compiled modules read others'
    types and constants) and this interpreter."""
    root = PACKAGE.parent  # snapscale/
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return {"sources": h.hexdigest(), "python": sys.implementation.cache_tag, "version": sys.version}


def stale(where: Path = NATIVE_DIR) -> str | None:
    """Why the build in `where` cannot be used, or None."""
    try:
        built = json.loads((where / STAMP).read_text())
    except (OSError, ValueError):
        return f"no build in {where}"
    if not isinstance(built, dict):
        return f"{where / STAMP}: not a stamp"
    now = stamp()
    if built.get("python") != now["python"] or built.get("version") != now["version"]:
        return f"built for Python {built.get('version')!r}, this is {now['version']!r}"
    if built.get("sources") != now["sources"]:
        return "the sources changed since the build"
    return None


def activate(where: Path = NATIVE_DIR) -> str:
    """Load the compiled modules from `where` from now on if its build is current; answer which
    simulator will run and, when it is the interpreted one, why. Call before anything imports
    the modules in `COMPILED`."""
    if os.environ.get(INTERPRETED_ENV):
        return f"interpreted ({INTERPRETED_ENV} is set)"
    path: list[str] = sys.modules[__package__].__path__  # type: ignore[assignment]
    if str(where) in path:
        return "compiled with mypyc"
    if loaded := [m for m in COMPILED if f"{__package__}.{m}" in sys.modules]:
        return f"interpreted ({', '.join(loaded)} imported before the build could be loaded)"
    why = stale(where)
    if why is not None:
        return f"interpreted ({why}; `python -m snapscale.simulate.native build` makes it ~1.2x faster)"
    path.insert(0, str(where))
    return "compiled with mypyc"


def build(into: Path = NATIVE_DIR) -> None:
    """Compile `COMPILED` with mypyc and put the extensions and their stamp in `into`, replacing
    what was there only once the build succeeded."""
    from mypyc.build import mypycify  # a dev dependency: only the build needs it
    from setuptools import setup  # type: ignore[import-untyped]  # (typeshed dropped its stubs)

    want = stamp()
    srcs = [str(PACKAGE / f"{m}.py") for m in COMPILED]
    into.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".native-", dir=into.parent) as tmp:
        work = Path(tmp)
        cwd = os.getcwd()
        os.chdir(PACKAGE.parent.parent)  # mypy reads the project's configuration here
        try:
            exts = mypycify(srcs, group_name=GROUP, target_dir=str(work / "c"))
            os.chdir(work)  # and setuptools, which must not read it
            setup(
                name="snapscale-simulate-native",
                ext_modules=exts,
                script_args=["-q", "build_ext", "--build-lib", str(work / "lib"), "--build-temp",
                             str(work / "tmp")],
            )  # fmt: skip
        finally:
            os.chdir(cwd)
        out = work / "out"
        out.mkdir()
        for so in (work / "lib").rglob("*.so"):
            shutil.move(str(so), out / so.name)
        (out / STAMP).write_text(json.dumps(want, indent=1) + "\n")
        old = work / "old"
        if into.exists():
            into.rename(old)
        out.rename(into)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snapscale.simulate.native", description=__doc__)
    p.add_argument("action", choices=("build", "check"), help="build: compile; check: is the build current")
    p.add_argument("--if-stale", action="store_true", help="build: only when the build is not current")
    p.add_argument("--into", type=Path, default=NATIVE_DIR, help="where the build goes")
    args = p.parse_args(argv)
    why = stale(args.into)
    if args.action == "check":
        print(why or f"current: {args.into}")
        return 0 if why is None else 1
    if args.if_stale and why is None:
        print(f"current: {args.into}")
        return 0
    build(args.into)
    print(f"built: {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
