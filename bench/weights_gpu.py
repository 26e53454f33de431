"""Weights outside the image, measured (issue 19): the GPU sample with and without snapscale.workload,
side by side in one run, at one model size.

Modes: `image` is today's path (the weights go through the CUDA checkpoint and the CRIU image);
`outside` starts the sample with `--weights-outside` (weights in a CUDA VMM range, released before
the CUDA checkpoint, mapped back at the same addresses and filled after the restore from chunk files
named by digest, as a restorer's host cache holds them). Each mode, on one card:

1. cold boot -> first answer (the mode's reference: torch.compile, a CUDA graph, a KV cache);
2. resume: `engine.before_suspend`, `engine.suspend`, `engine.resume`, `engine.after_resume` (the
   hooks around suspend/resume as the restorer runs them; after_restore with the chunk dir);
3. freeze through the engine, sandbox stopped: hooks, CUDA checkpoint, CRIU dump, zero pages;
4. restore: CRIU, CUDA restore, after_restore (the weights mapped and filled), ready, first answer;
5. the same restore with CRIU at -v4, profiled from its log (engine/criu_profile.py).

Every answer is compared byte for byte with the mode's cold boot, and the two modes' cold answers
with each other. Prints one table (seconds per phase, image size, time per GB of weights) and writes
`weights_gpu_<preset>.json` to --out.

Presets (Llama-shaped, bf16 random weights written once to --work as safetensors): `0.8b` (the
reference sandbox, llama-0.8b), `3b` (llama-3b, 3.6 B), `8b` (llama-8b, 8.0 B).

On the GPU machine (root, repo root; `scripts/gpu_bundle` here first, then the device call with
carry [".e2e-bundle"]), one preset a call, inside its 10 minutes:

    set -o pipefail; . .e2e-bundle/setup.sh || exit 9;
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader;
    timeout 570 python3 -m bench.weights_gpu --preset 0.8b --out $OUT 2>&1 | tee $OUT/bench.log

For `8b`, split by mode if one call is not enough: `--skip outside`, then `--skip image` (the weights
file is written again in each fresh machine: ~1 min for 16 GB). `--skip resume`, `--skip profile`
drop those steps. `--fill host` has the weights filled by a host process beside each restore and
resume and handed over as an fd (restorer/hostfill.py), as SNAPSCALE_WEIGHTS_FILL=host. `--cpu` runs
the flow with the tiny CPU sample (no CUDA steps, no resume) where there is no GPU: how this bench
was debugged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.weights_report import table
from snapscale.restorer import hostfill
from snapscale.restorer.standby import Fillers
from snapscale.shared.bus.spec import DeploymentSpec, HooksSpec, ReadySpec
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import CriuBinary, find_criu
from snapscale.shared.engine.criu_profile import profile_file
from snapscale.shared.engine.lifecycle import Sandbox
from snapscale.workload import ChunkDir, FillSource, WeightsRecord
from snapscale.workload.record import IMAGE_FILE

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"0.8b": "llama-0.8b", "3b": "llama-3b", "8b": "llama-8b", "tiny": "tiny"}
STEPS = ("image", "outside", "resume", "profile")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_weights(path: Path, preset: str, dtype: str, device: str) -> None:
    """Deterministic random weights as safetensors, in a child process: this one keeps no CUDA
    context and no 16 GB of host tensors."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, torch; from safetensors.torch import save_file; "
        "from examples.sample_server.model import PRESETS, random_state_dict; "
        "save_file(random_state_dict(PRESETS[sys.argv[2]], 0, getattr(torch, sys.argv[3]), "
        "device=sys.argv[4]), sys.argv[1] + '.tmp')"
    )
    s = time.monotonic()
    subprocess.run([sys.executable, "-c", code, str(path), preset, dtype, device], cwd=ROOT, check=True)
    os.rename(f"{path}.tmp", path)
    say(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.monotonic() - s:.1f}s")


def params_of(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of a safetensors file, from its header."""
    from snapscale.workload.stfile import DTYPE_BYTES, read_layout

    layout = read_layout(str(path))
    return sum(t.nbytes // DTYPE_BYTES[t.dtype] for t in layout), sum(t.nbytes for t in layout)


def spec_for(args: argparse.Namespace, weights: Path, mode: str) -> DeploymentSpec:
    skip = ("OUT", "PWD", "OLDPWD", "SHLVL", "_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAPSCALE_", "OTEL_")) and k not in skip}
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no compile-worker pool: fewer processes to freeze
    cmd = [sys.executable, "-m", "examples.sample_server.server", "--preset", PRESETS[args.preset],
           "--weights", str(weights), "--port", "8000", "--kv-mib", str(args.kv_mib)]  # fmt: skip
    if not args.cpu:
        cmd += ["--device", "cuda", "--dtype", "bf16", "--compile", "--graph"]
    if mode == "outside":
        cmd.append("--weights-outside")
    return DeploymentSpec(
        name=f"weights-{mode}",
        command=cmd,
        env=env,
        cwd=str(ROOT),
        gpus=0 if args.cpu else 1,
        hooks=HooksSpec(
            before_freeze="/hooks/before_freeze", after_restore="/hooks/after_restore", timeout_s=300
        ),
        ready=ReadySpec(http_path="/healthz", timeout_s=600, interval_s=0.02),
    )


async def answer(sb: Sandbox) -> bytes:
    status, body = await probe.http_request("GET", sb.endpoint, "/generate", timeout_s=120)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {body[:300]!r}")
    return body


async def workload_timings(sb: Sandbox) -> dict[str, Any]:
    _, body = await probe.http_request("GET", sb.endpoint, "/timings", timeout_s=10)
    out: dict[str, Any] = json.loads(body)
    return out


def chunk_dir(record: WeightsRecord, dest: Path) -> float:
    """The host cache's share of `record`: one file per chunk, named by digest (kept across modes
    and runs: a chunk already there is not written again). Seconds taken."""
    s = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    fds: dict[str, int] = {}
    try:
        for d, src in record.sources().items():
            target = dest / d
            if target.exists() and target.stat().st_size == src.length:
                continue
            fd = fds.setdefault(src.path, os.open(src.path, os.O_RDONLY))
            tmp = dest / f".{d}.tmp"
            tmp.write_bytes(os.pread(fd, src.length, src.offset))
            tmp.rename(target)
    finally:
        for fd in fds.values():
            os.close(fd)
    return time.monotonic() - s


def fill_source(
    args: argparse.Namespace, record: WeightsRecord | None, record_dir: Path, cache: Path, gpus: list[str],
    run_dir: Path | None = None,
) -> contextlib.AbstractAsyncContextManager[FillSource | None]:  # fmt: skip
    """The chunk dir, or with `--fill host` a filler filling from it beside the restore or resume
    (what the restorer runs with SNAPSCALE_WEIGHTS_FILL=host)."""
    if record is None:
        return contextlib.nullcontext(None)
    if args.fill != "host" or not gpus:
        return contextlib.nullcontext(ChunkDir(str(cache)))
    gpu = hostfill.target_gpu(record, gpus)
    job = hostfill.Job(record, record_dir / IMAGE_FILE, cache, gpu, run_dir or record_dir)
    return _host_fill(job, Fillers([gpu], standby=False))


@contextlib.asynccontextmanager
async def _host_fill(job: hostfill.Job, fillers: Fillers) -> AsyncIterator[FillSource | None]:
    """A filler started for the job (no standby: the bench's runs are one restore or resume each)."""
    async with hostfill.host_fill(job, fillers) as fill:
        yield fill.source  # the workload's after_restore waits for the fd itself


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


def gpu_used() -> str:
    if not shutil.which("nvidia-smi"):
        return "-"
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    return out.strip().replace("\n", "; ")


async def run_mode(
    args: argparse.Namespace, mode: str, weights: Path, criu: CriuBinary, gpus: list[str]
) -> tuple[dict[str, Any], bytes]:
    """One mode's cold boot, resume, freeze, restore and profiled restore; its results and its
    cold-boot answer."""
    spec = spec_for(args, weights, mode)
    work = Path(args.work) / mode
    shutil.rmtree(work, ignore_errors=True)
    images = Path(args.images) / mode
    shutil.rmtree(images, ignore_errors=True)
    cache = Path(args.work) / "cache" / "chunks"
    res: dict[str, Any] = {"command": spec.command}
    live: list[Sandbox] = []
    try:
        s = time.monotonic()
        sb = await engine.launch(spec, f"{mode}-cold", gpu_uuids=gpus, run_dir=work / "cold")
        live.append(sb)
        await engine.wait_ready(sb, spec.ready)
        ref = await answer(sb)
        res["cold_boot_s"] = round(time.monotonic() - s, 3)
        res["cold_boot_phases_s"] = await workload_timings(sb)
        res["gpu_mem_warm"] = gpu_used()
        say(f"{mode}: cold boot {res['cold_boot_s']:.1f}s {ref[:100]!r}")
        checks = {"cold": True}

        if "resume" not in args.skip and not args.cpu:
            # What the restorer's suspend and resume do: the hooks around suspend/resume.
            rec = await engine.before_suspend(sb, spec)
            if rec is not None:
                res["chunks_written_s"] = round(chunk_dir(rec, cache), 3)
            susp = await engine.suspend(sb)
            res["gpu_mem_suspended"] = gpu_used()
            s = time.monotonic()
            live.remove(sb)
            async with fill_source(args, rec, Path(sb.run_dir), cache, gpus) as src:
                sb = await engine.resume(sb, gpus)
                live.append(sb)
                t_cuda = time.monotonic() - s
                await engine.after_resume(sb, spec, src)
            t_after = time.monotonic() - s - t_cuda
            got = await answer(sb)
            took = time.monotonic() - s
            res["resume"] = {"suspend_s": susp["suspend"], "cuda_restore_s": round(t_cuda, 3),
                             "after_restore_s": round(t_after, 3), "to_answer_s": round(took, 3),
                             "workload": await workload_timings(sb)}  # fmt: skip
            checks["resume"] = got == ref
            say(f"{mode}: resume {res['resume']} same={got == ref}")

        rep = await engine.freeze(sb, spec, images, keep_running=False, criu=criu)
        live.remove(sb)
        res["freeze"] = asdict(rep)
        say(f"{mode}: freeze {rep.timings_s} image {rep.image_bytes / 2**30:.2f} GiB, "
            f"weights outside {rep.weights_bytes / 2**30:.2f} GiB")  # fmt: skip
        record = engine.read_weights(images)
        if record is not None:
            res["chunks_written_s"] = round(res.get("chunks_written_s", 0) + chunk_dir(record, cache), 3)

        for step, level in (("restore", 2), ("profiled", 4)):
            if step == "profiled" and "profile" in args.skip:
                continue
            if args.drop_caches and step == "restore":
                await asyncio.to_thread(drop_caches)
            run_dir = work / step
            s = time.monotonic()
            async with fill_source(args, record, images, cache, gpus, run_dir) as source:
                rsb, rr = await engine.restore(spec, images, f"{mode}-{step}", gpu_uuids=gpus,
                                               run_dir=run_dir, criu=criu, weights=source,
                                               criu_log_level=level)  # fmt: skip
            live.append(rsb)
            got = await answer(rsb)
            took = time.monotonic() - s
            out: dict[str, Any] = {"to_answer_s": round(took, 3), "timings_s": rr.timings_s,
                                   "criu_stats": rr.criu_stats, "gpu_mem": gpu_used(),
                                   "workload": await workload_timings(rsb)}  # fmt: skip
            if level == 4:
                log = max(run_dir.glob("criu-restore-*.log"), key=lambda p: p.stat().st_mtime)
                prof = profile_file(log)
                out["criu"] = {"phases_s": prof.phases_s, "page_bytes": prof.page_bytes,
                               "page_reads": prof.page_reads, "page_gbps": round(prof.page_gbps, 3),
                               "logged_s": prof.logged_s, "slowest": prof.slowest,
                               "unlogged_s": round(rr.timings_s["criu_restore"] - prof.logged_s, 4),
                               }  # fmt: skip
            res[step] = out
            checks[step] = got == ref
            say(f"{mode}: {step} -> first answer {took:.2f}s {rr.timings_s} same={got == ref}")
            await engine.stop(rsb)
            live.remove(rsb)
        res["checks"] = checks
        res["identical"] = all(checks.values())
        return res, ref
    finally:
        for x in live:
            await engine.stop(x)
        shutil.rmtree(images, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    criu = find_criu(args.criu)
    gpus: list[str] = []
    results: dict[str, Any] = {"preset": PRESETS[args.preset], "criu": criu.version, "modes": {},
                               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if not args.cpu:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        gpus = [str(pynvml.nvmlDeviceGetUUID(h))]
        results["gpu"] = f"{pynvml.nvmlDeviceGetName(h)}, driver {pynvml.nvmlSystemGetDriverVersion()}"
    weights = Path(args.work) / f"{PRESETS[args.preset]}.safetensors"
    write_weights(weights, PRESETS[args.preset], "float32" if args.cpu else "bfloat16",
                  "cpu" if args.cpu else "cuda")  # fmt: skip
    results["params"], results["weights_bytes"] = params_of(weights)
    params = results["params"] / 1e9
    say(f"{results['preset']}: {params:.2f} B params; CRIU {criu.version}; {results.get('gpu', 'no GPU')}")
    path = out / f"weights_gpu_{args.preset}.json"
    try:
        os.environ.setdefault("SNAPSCALE_SANDBOX", "host")  # dev mode: host-process sandboxes
        asyncio.run(play(args, weights, criu, gpus, results, path))
    finally:
        path.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    print(table(results), flush=True)
    ok = all(m.get("identical") for m in results["modes"].values())
    return 0 if ok and results.get("cold_answers_identical", True) else 1


async def play(
    args: argparse.Namespace, weights: Path, criu: CriuBinary, gpus: list[str], results: dict[str, Any],
    path: Path,
) -> None:  # fmt: skip
    """Each mode in turn; a mode that fails is reported and the other still runs."""
    refs: dict[str, bytes] = {}
    for mode in ("image", "outside"):
        if mode in args.skip:
            continue
        try:
            results["modes"][mode], refs[mode] = await run_mode(args, mode, weights, criu, gpus)
        except Exception as e:
            say(f"{mode}: FAILED {type(e).__name__}: {e}")
            results["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
        await asyncio.to_thread(path.write_text, json.dumps(results, indent=1, sort_keys=True, default=str))
    if len(refs) == 2:
        results["cold_answers_identical"] = refs["image"] == refs["outside"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.8b")
    p.add_argument("--out", default="/tmp/weights-out")
    p.add_argument("--work", default="/tmp/weights-work", help="weights files, chunk dir, run dirs")
    p.add_argument("--images", default="/dev/shm/snapscale-weights-images", help="CRIU images (tmpfs)")
    p.add_argument("--kv-mib", type=int, default=4096)
    p.add_argument("--skip", default="", type=lambda s: {x for x in s.split(",") if x},
                   help=f"comma-separated, of {','.join(STEPS)}")  # fmt: skip
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before the first restore")
    p.add_argument("--criu", default=os.environ.get("SNAPSCALE_CRIU"), help="CRIU binary (SNAPSCALE_CRIU)")
    p.add_argument("--cpu", action="store_true", help="the tiny CPU sample, no CUDA steps (no GPU here)")
    p.add_argument("--fill", choices=("workload", "host"), default="workload",
                   help="who fills the weights after a restore or resume: the workload from the chunk dir, "
                   "or a host process beside it, handed over as an fd (SNAPSCALE_WEIGHTS_FILL)")  # fmt: skip
    a = p.parse_args(argv)
    if bad := a.skip - set(STEPS):
        p.error(f"--skip: unknown {sorted(bad)} (choose from {','.join(STEPS)})")
    if a.cpu:
        a.preset = "tiny"
        a.kv_mib = min(a.kv_mib, 8)
        a.skip |= {"resume"}
    return a


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("needs root: sandboxes get network namespaces, CRIU")
    sys.exit(main(parse()))
