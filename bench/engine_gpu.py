"""GPU benchmark of the engine on the sample sandbox: cold boot vs freeze vs restore vs suspend/resume.

Llama-shaped model (0.84 B params, bf16, random weights written to safetensors first), torch.compile,
a captured CUDA graph and a KV cache of --kv-gib. Every answer is compared byte for byte with the
cold-booted one. Run as root on a GPU host from the repo root: `python3 -m bench.engine_gpu --out DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import find_criu
from snapscale.shared.engine.lifecycle import Sandbox

ROOT = Path(__file__).resolve().parents[1]
RESULTS: dict[str, Any] = {}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpus() -> list[tuple[str, str, str]]:
    import pynvml

    pynvml.nvmlInit()
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        out.append(
            (
                str(pynvml.nvmlDeviceGetName(h)),
                str(pynvml.nvmlDeviceGetUUID(h)),
                str(pynvml.nvmlSystemGetDriverVersion()),
            )
        )
    return out


def gpu_mem_used_mib() -> list[int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [int(x) for x in out.split()]


async def answer(sb: Sandbox) -> bytes:
    status, body = await probe.http_request("GET", sb.endpoint, "/generate", timeout_s=120)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {body[:200]!r}")
    return body


def write_weights(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from examples.sample_server.model import PRESETS, random_state_dict

    s = time.time()
    sd = random_state_dict(PRESETS["llama-0.8b"], 0, torch.bfloat16, device="cuda")
    save_file(sd, str(path))
    n = sum(v.numel() for v in sd.values())
    RESULTS["params"] = n
    say(f"weights: {n / 1e9:.3f} B params, {path.stat().st_size / 2**30:.2f} GiB in {time.time() - s:.1f}s")


def gpu_parser(
    doc: str | None, *, out: str, work: str, images: str, kv_gib: int, criu: str | None
) -> argparse.ArgumentParser:
    """The options every GPU bench takes; each bench its own defaults."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--out", default=out)
    p.add_argument("--work", default=work)
    p.add_argument("--images", default=images)
    p.add_argument("--kv-gib", type=int, default=kv_gib)
    found = criu or "found as the engine finds it"
    p.add_argument("--criu", default=criu, help=f"the CRIU binary (default: {found})")
    return p


def gpu_spec(
    name: str, cmd: list[str], n_gpus: int, hooks: HooksSpec | None = None, **env: str
) -> DeploymentSpec:
    """The GPU sample as a deployment: this environment less its SNAPSCALE_ variables (plus `env`),
    run from the repository, up to 600 s to get ready."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSCALE_")}
    return DeploymentSpec(
        name=name,
        command=cmd,
        env={**base, **env},
        cwd=str(ROOT),
        gpus=n_gpus,
        hooks=hooks or HooksSpec(),
        ready=ReadySpec(http_path="/healthz", timeout_s=600, interval_s=0.05),
    )


async def stop_and_write(live: list[Sandbox], t: dict[str, float], res: dict[str, Any], path: Path) -> None:
    """Stop the sandboxes still up; write `res` with the timings `t` (rounded) to `path`."""
    for x in live:
        await engine.stop(x)
    res["timings_s"] = {k: round(v, 3) for k, v in t.items()}
    await asyncio.to_thread(path.write_text, json.dumps(res, indent=1, sort_keys=True, default=str))


def prepare(out: Path, images: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(images, ignore_errors=True)


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


async def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    prepare(out, Path(args.images))
    criu = find_criu(args.criu)
    cards = gpus()
    RESULTS["cards"] = cards
    RESULTS["criu"] = criu.version
    say(f"GPUs: {cards}; CRIU {criu.version}")
    weights = Path(args.work) / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    if not weights.exists():
        write_weights(weights)
    cmd = [
        sys.executable,
        "-m",
        "examples.sample_server.server",
        "--preset",
        "llama-0.8b",
        "--device",
        "cuda",
        "--dtype",
        "bf16",
        "--compile",
        "--graph",
        "--kv-mib",
        str(args.kv_gib * 1024),
        "--weights",
        str(weights),
        "--port",
        "8000",
    ]
    hooks = HooksSpec(
        before_freeze="/hooks/before_freeze", after_restore="/hooks/after_restore", timeout_s=120
    )
    # TORCHINDUCTOR_COMPILE_THREADS=1: no compile-worker pool, fewer processes in the tree
    spec = gpu_spec("llama", cmd, 1, hooks, TORCHINDUCTOR_COMPILE_THREADS="1")
    spec_nohooks = replace(spec, hooks=HooksSpec())
    uuid0 = cards[0][1]
    other = cards[1][1] if len(cards) > 1 else uuid0
    img_root = Path(args.images)
    t: dict[str, float] = {}
    live: list[Sandbox] = []
    try:
        # 1. Cold boot: launch -> ready -> first answer.
        s = time.monotonic()
        sb = await engine.launch(spec, "cold", gpu_uuids=[uuid0], run_dir=Path(args.work) / "run-cold")
        live.append(sb)
        await engine.wait_ready(sb, spec.ready)
        ref = await answer(sb)
        t["cold_boot_to_first_answer_s"] = time.monotonic() - s
        _, timings = await probe.http_request("GET", sb.endpoint, "/timings", timeout_s=10)
        RESULTS["cold_boot_phases_s"] = json.loads(timings)
        RESULTS["reference_answer"] = json.loads(ref)
        RESULTS["gpu_mem_mib_warm"] = gpu_mem_used_mib()
        say(f"cold boot {t['cold_boot_to_first_answer_s']:.1f}s, answer {ref[:120]!r}")

        # 2. Suspend in place (GPU -> host memory, GPU freed) and resume.
        st = await engine.suspend(sb)
        t["suspend_s"] = st["suspend"]
        RESULTS["gpu_mem_mib_suspended"] = gpu_mem_used_mib()
        s = time.monotonic()
        # On a 2-GPU host the sandbox comes back on the other card (CUDA restore with a UUID remap).
        live.remove(sb)
        sb = await engine.resume(sb, [other])
        live.append(sb)
        RESULTS["resumed_on"] = other
        got = await answer(sb)
        t["resume_to_first_answer_s"] = time.monotonic() - s
        RESULTS["resume_answer_identical"] = got == ref
        RESULTS["gpu_mem_mib_after_resume"] = gpu_mem_used_mib()
        say(
            f"suspend {t['suspend_s']:.2f}s resume->answer {t['resume_to_first_answer_s']:.2f}s "
            f"same={got == ref}"
        )

        # 3. Freeze keeping it serving, with the KV hooks (image without the KV cache).
        img_hooks = img_root / "hooks"
        rep1 = await engine.freeze(sb, spec, img_hooks, keep_running=True, criu=criu)
        got = await answer(sb)
        RESULTS["freeze_hooks"] = asdict(rep1)
        RESULTS["after_freeze_keep_running_identical"] = got == ref
        say(
            f"freeze (hooks, keep running): {rep1.timings_s} {rep1.image_bytes / 2**30:.2f} GiB "
            f"same={got == ref}"
        )

        # 4. Freeze without hooks and stop (the KV cache goes into the image).
        img_full = img_root / "full"
        rep2 = await engine.freeze(sb, spec_nohooks, img_full, keep_running=False, criu=criu)
        live.remove(sb)
        RESULTS["freeze_nohooks"] = asdict(rep2)
        RESULTS["gpu_mem_mib_after_stop"] = gpu_mem_used_mib()
        say(f"freeze (no hooks, stop): {rep2.timings_s} {rep2.image_bytes / 2**30:.2f} GiB")

        # 5. Restores: restore start -> first correct answer.
        # Frozen on `other`: the hooks image restores onto GPU 0 (a remap where there are 2 GPUs).
        for name, img, sp, card in (
            ("hooks", img_hooks, spec, uuid0),
            ("full", img_full, spec_nohooks, other),
        ):
            if args.drop_caches:
                drop_caches()
            s = time.monotonic()
            rsb, rr = await engine.restore(
                sp,
                img,
                f"restore-{name}",
                gpu_uuids=[card],
                run_dir=Path(args.work) / f"run-{name}",
                criu=criu,
                checkpoint_id=name,
            )
            live.append(rsb)
            got = await answer(rsb)
            t[f"restore_{name}_to_first_answer_s"] = time.monotonic() - s
            RESULTS[f"restore_{name}"] = asdict(rr)
            RESULTS[f"restore_{name}_identical"] = got == ref
            RESULTS[f"gpu_mem_mib_restore_{name}"] = gpu_mem_used_mib()
            say(
                f"restore ({name}): {rr.timings_s} "
                f"first answer {t[f'restore_{name}_to_first_answer_s']:.2f}s "
                f"same={got == ref}"
            )
            if got != ref:
                say(f"DIFFERENT: {got[:300]!r}")
            await engine.stop(rsb)
            live.remove(rsb)
    finally:
        await stop_and_write(live, t, RESULTS, out / "engine_gpu.json")
    cold = t["cold_boot_to_first_answer_s"]
    for name in ("hooks", "full"):
        r = t[f"restore_{name}_to_first_answer_s"]
        say(f"restore ({name}) {r:.2f}s vs cold boot {cold:.1f}s: {cold / r:.1f}x")
    return 0


if __name__ == "__main__":
    out, work, images = "/tmp/bench-out", "/tmp/bench-work", "/dev/shm/snapscale-images"
    p = gpu_parser(__doc__, out=out, work=work, images=images, kv_gib=4, criu=None)
    p.add_argument("--drop-caches", action="store_true")
    os.environ.setdefault("SNAPSCALE_SANDBOX", "host")  # dev mode: host-process sandboxes
    sys.exit(asyncio.run(main(p.parse_args())))
