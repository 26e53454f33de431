"""One sandbox process that uses two GPUs, frozen and restored by the engine (issue 9).

The GPU sample (`llama-0.8b` in bf16 from safetensors, a captured CUDA graph, no torch.compile to
keep the run short) with its model on the first card and its KV cache on the second
(`--kv-device cuda:1`); every answer runs the model on card 0 and sums the KV cache on card 1.
Steps: cold boot → reference answer → freeze (the KV cache stays in the image: no hooks) →
restore on the same two cards → answer → restore with the cards swapped (UUID remap of both) →
answer. Answers are compared byte for byte; each restore is timed to its first correct answer.

Run on a 2-GPU machine: python3 -m bench.two_gpu --out $OUT [--kv-gib 2]
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

from bench.engine_gpu import (
    answer,
    gpu_mem_used_mib,
    gpu_parser,
    gpu_spec,
    gpus,
    say,
    stop_and_write,
    write_weights,
)
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine.criu import find_criu
from snapscale.shared.engine.lifecycle import Sandbox


def prepare(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    out, work, images = Path(a.out), Path(a.work), Path(a.images)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(images, ignore_errors=True)
    return out, work, images


async def main(a: argparse.Namespace, out: Path, work: Path, images: Path) -> int:
    res: dict[str, Any] = {"command": "python3 -m bench.two_gpu " + " ".join(sys.argv[1:])}
    cards = gpus()
    res["cards"] = cards
    if len(cards) < 2:
        say(f"needs 2 GPUs, found {cards}")
        return 2
    criu = find_criu(a.criu)
    res["criu"] = criu.version
    weights = work / "model.safetensors"
    if not await asyncio.to_thread(weights.exists):
        write_weights(weights)
    cmd = [
        sys.executable, "-m", "examples.sample_server.server", "--preset", "llama-0.8b",
        "--device", "cuda:0", "--kv-device", "cuda:1", "--dtype", "bf16", "--graph",
        "--kv-mib", str(a.kv_gib * 1024), "--weights", str(weights), "--port", "8000",
    ]  # fmt: skip
    spec = gpu_spec("two-gpu", cmd, 2)
    u0, u1 = cards[0][1], cards[1][1]
    t: dict[str, float] = {}
    live: list[Sandbox] = []
    ok = True
    try:
        s = time.monotonic()
        sb = await engine.launch(spec, "cold", gpu_uuids=[u0, u1], run_dir=work / "run-cold")
        live.append(sb)
        await engine.wait_ready(sb, spec.ready)
        ref = await answer(sb)
        t["cold_boot_to_first_answer_s"] = time.monotonic() - s
        res["reference_answer"] = json.loads(ref)
        res["gpu_mem_mib_warm"] = gpu_mem_used_mib()
        say(f"cold boot {t['cold_boot_to_first_answer_s']:.1f}s on {[u0, u1]}; GPU MiB "
            f"{res['gpu_mem_mib_warm']}; answer {ref[:160]!r}")  # fmt: skip

        img = images / "two"
        rep = await engine.freeze(sb, spec, img, keep_running=False, criu=criu)
        live.remove(sb)
        res["freeze"] = asdict(rep)
        res["gpu_mem_mib_frozen"] = gpu_mem_used_mib()
        dropped_mb = rep.zero_bytes_dropped / 1e6
        say(f"freeze: {rep.timings_s} image {rep.image_bytes / 2**30:.2f} GiB "
            f"({dropped_mb:.0f} MB zero dropped); GPU MiB {res['gpu_mem_mib_frozen']}")  # fmt: skip

        for name, target in (("same cards", [u0, u1]), ("cards swapped", [u1, u0])):
            s = time.monotonic()
            rsb, rr = await engine.restore(
                spec, img, f"r-{len(t)}", gpu_uuids=target, run_dir=work / f"run-{len(t)}", criu=criu
            )
            live.append(rsb)
            got = await answer(rsb)
            key = name.replace(" ", "_")
            t[f"restore_{key}_to_first_answer_s"] = time.monotonic() - s
            same = got == ref
            ok = ok and same
            res[f"restore_{key}"] = asdict(rr) | {"identical": same, "gpu_mem_mib": gpu_mem_used_mib()}
            say(f"restore ({name}, onto {target}): {rr.timings_s} pairs {rr.gpu_pairs} first answer "
                f"{t[f'restore_{key}_to_first_answer_s']:.2f}s same={same}; GPU MiB "
                f"{res[f'restore_{key}']['gpu_mem_mib']}")  # fmt: skip
            if not same:
                say(f"DIFFERENT: {got[:300]!r}")
            await engine.stop(rsb)
            live.remove(rsb)
    finally:
        await stop_and_write(live, t, res, out / "two_gpu.json")
    return 0 if ok else 1


if __name__ == "__main__":
    args = gpu_parser(
        __doc__,
        out="/tmp/two-gpu-out",
        work="/tmp/two-gpu-work",
        images="/dev/shm/snapscale-two-gpu",
        kv_gib=2,
        criu=os.environ.get("SNAPSCALE_CRIU"),
    ).parse_args()
    os.environ.setdefault("SNAPSCALE_SANDBOX", "host")  # dev mode: host-process sandboxes
    sys.exit(asyncio.run(main(args, *prepare(args))))
