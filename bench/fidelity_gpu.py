"""The GPU rows of the fidelity matrix (docs/fidelity.md): a sandbox whose parent (API server) and
child (engine) processes both hold CUDA contexts and talk over a loopback TCP connection
(tests/fidelity/gpu_workload.py), cold-booted, frozen keeping it serving, stopped, and restored:
on the same GPU and, on a host with two, on the other one. Each answer (a digest of a computation
on each process's resident GPU tensors, and both PIDs) must equal the cold-booted one.

Run as root on a GPU host from the repo root (with the GPU bundle, scripts/gpu_bundle):
    python3 -m bench.fidelity_gpu --out DIR
Writes DIR/fidelity_gpu.json; exits 1 if an answer differs, 2 without a usable GPU or root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec
from snapscale.shared.core.errors import ConfigError
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import find_criu
from snapscale.shared.engine.lifecycle import Sandbox

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ROOT / "tests" / "fidelity" / "gpu_workload.py"  # beside the CPU matrix's workload


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cards() -> list[tuple[str, str]]:
    """(name, UUID) of each GPU; `SystemExit(2)` saying why there is none to use."""
    if os.geteuid() != 0:
        raise SystemExit("bench/fidelity_gpu needs root (CRIU, network namespaces, CUDA checkpoints)")
    try:
        import pynvml

        pynvml.nvmlInit()
        found = [
            (str(pynvml.nvmlDeviceGetName(h)), str(pynvml.nvmlDeviceGetUUID(h)))
            for h in (pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount()))
        ]
    except Exception as e:  # no pynvml, no driver, no device: all the same here
        print(f"bench/fidelity_gpu needs an NVIDIA GPU: NVML found none ({e!r})", file=sys.stderr)
        raise SystemExit(2) from None
    if not found:
        print("bench/fidelity_gpu needs an NVIDIA GPU: NVML lists no device", file=sys.stderr)
        raise SystemExit(2)
    return found


def prepare(out: Path, images: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(images, ignore_errors=True)


async def answer(sb: Sandbox) -> dict[str, Any]:
    status, body = await probe.http_request("GET", sb.endpoint, "/answer", timeout_s=120)
    if status != 200:
        raise RuntimeError(f"/answer answered {status}: {body[:300]!r}")
    out: dict[str, Any] = json.loads(body)
    return out


def spec() -> DeploymentSpec:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSCALE_")}
    return DeploymentSpec(
        name="fidelity-gpu",
        command=[sys.executable, str(WORKLOAD)],
        env=env,
        cwd=str(ROOT),
        gpus=1,
        hooks=HooksSpec(),
        ready=ReadySpec(http_path="/healthz", timeout_s=300, interval_s=0.05),
    )


async def main(args: argparse.Namespace) -> int:
    found = cards()
    try:
        criu = find_criu(args.criu)
    except ConfigError as e:
        print(f"bench/fidelity_gpu: {e}", file=sys.stderr)
        return 2
    out, work, images = Path(args.out), Path(args.work), Path(args.images)
    prepare(out, images)
    results: dict[str, Any] = {"cards": found, "criu": criu.version, "rows": {}}
    say(f"GPUs: {found}; CRIU {criu.version}")
    sp = spec()
    first = found[0][1]
    other = found[1][1] if len(found) > 1 else first
    live: list[Sandbox] = []
    ok = True
    try:
        sb = await engine.launch(sp, "cold", gpu_uuids=[first], run_dir=work / "run-cold")
        live.append(sb)
        await engine.wait_ready(sb, sp.ready)
        ref = await answer(sb)
        results["reference"] = ref
        say(f"cold boot: {ref}")
        rep = await engine.freeze(sb, sp, images / "img", keep_running=True, criu=criu)
        results["freeze"] = asdict(rep)
        kept = await answer(sb)
        results["rows"]["kept_serving_after_freeze"] = kept == ref
        say(f"frozen ({rep.timings_s}, cuda={rep.cuda}); still serving the same: {kept == ref}")
        await engine.stop(sb)
        live.remove(sb)
        for name, card in (("same_gpu", first), ("other_gpu", other)):
            if name == "other_gpu" and other == first:
                results["rows"][name] = "skipped: one GPU"
                continue
            rsb, rr = await engine.restore(
                sp,
                images / "img",
                f"restore-{name}",
                gpu_uuids=[card],
                run_dir=work / f"run-{name}",
                criu=criu,
            )
            live.append(rsb)
            got = await answer(rsb)
            same = got == ref  # both digests and both PIDs: the same processes, the same GPU memory
            results["rows"][name] = same
            results[f"restore_{name}"] = asdict(rr)
            say(f"restored on {card} ({rr.timings_s}): identical answers from both processes: {same}")
            if not same:
                say(f"DIFFERENT: {got}")
            ok = ok and same
            await engine.stop(rsb)
            live.remove(rsb)
        ok = ok and results["rows"]["kept_serving_after_freeze"] is True
    finally:
        for x in live:
            await engine.stop(x)
        (out / "fidelity_gpu.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    say(f"rows: {results['rows']} -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/bench-out")
    p.add_argument("--work", default="/tmp/bench-work")
    p.add_argument("--images", default="/dev/shm/snapscale-fidelity-images")
    p.add_argument("--criu", default=os.environ.get("SNAPSCALE_CRIU"))
    os.environ.setdefault("SNAPSCALE_SANDBOX", "host")  # dev mode: host-process sandboxes
    sys.exit(asyncio.run(main(p.parse_args())))
