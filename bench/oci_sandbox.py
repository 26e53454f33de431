"""The sample sandbox as an OCI image (runc) beside today's host-process sandbox, in the same run:
cold boot, freeze, restore (engine.launch / freeze / restore, no services), each kind in turn for
`--rounds` rounds, the order alternating; every restored replica's first answer must equal its cold
boot's byte for byte. The host kind gets a fresh HOME and TMPDIR each round, as the container gets a
fresh /tmp, so both compile from nothing and freeze the same process state.

The image is small (bench/oci_image.py: its own /etc, nothing else); the sample's code and the
host's Python environment come in as declared read-only mounts, with the weights' directory.
GPU (default): the sample of bench/e2e_gpu.py on one card. `--cpu`: the tiny CPU sample.
Needs root, CRIU, runc, umoci, skopeo; from the repo root:
`python3 -m bench.oci_sandbox --out DIR [--cpu] [--rounds 3]`. Writes DIR/oci_sandbox.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.oci_image import build_layout
from snapscale.shared.bus import spec
from snapscale.shared.bus.sandbox_spec import Mount, SandboxSpec
from snapscale.shared.engine import lifecycle as engine
from snapscale.shared.engine import probe
from snapscale.shared.engine.criu import CriuBinary, find_criu
from snapscale.shared.engine.criu_profile import profile_file
from snapscale.shared.engine.oci.container import CAP_SYS_RESOURCE, has_cap

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("host", "oci")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compiler_prefix() -> list[str]:
    """Where the C compiler lives when it is not under /usr (triton builds its launcher with it
    under torch.compile; `CC` or `gcc` on PATH, e.g. /opt/gcc on the GPU host): its prefix."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        return []
    prefix = Path(cc).resolve().parent.parent
    return [] if str(prefix).startswith("/usr") else [str(prefix)]


def host_paths(weights: Path) -> list[str]:
    """What the sample reads from the host: its code, the venv and its base interpreter, /usr, the
    directories on sys.path (PYTHONPATH's too), the weights file; each real path once, none inside
    another."""
    paths = [str(ROOT), sys.prefix, sys.base_prefix, "/usr", str(weights), *compiler_prefix()]
    paths += [p for p in sys.path if os.path.isabs(p) and os.path.isdir(p)]
    want = sorted({str(Path(p).resolve()) for p in paths})
    out: list[str] = []
    for p in want:
        if not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def oci_spec(base: spec.DeploymentSpec, image: str, weights: Path, *, gpu: bool) -> spec.DeploymentSpec:
    """`base` in an OCI sandbox; the default non-root user where this host's CRIU can dump it."""
    user = "1000:1000" if has_cap(CAP_SYS_RESOURCE, Path("/proc/self/status").read_text()) else "0:0"
    cpus = float(os.cpu_count() or 1)
    sb = SandboxSpec(
        image=image, user=user, memory_mib=(96 if gpu else 8) << 10, cpus=cpus, pids=4096, scratch_mib=0,
        mounts=[Mount(src=p, dst=p) for p in host_paths(weights)],
    )  # fmt: skip
    cmd = [sys.executable if c.endswith("python") else c for c in base.command]
    env = {**base.env, "HOME": "/tmp"}  # the image's /tmp: caches a non-root user may write
    return replace(base, name=f"{base.name}-oci", command=cmd, cwd=str(ROOT), env=env, sandbox=sb)


def samples(args: argparse.Namespace, work: Path) -> tuple[spec.DeploymentSpec, Path, list[str]]:
    if args.cpu:
        base = spec.load_spec(ROOT / "examples" / "sample_cpu_quick.toml")
        cmd = [sys.executable, *base.command[1:]]
        if args.cpu_kv_mib:  # a KV cache kept through the freeze: pages for the restore to read
            cmd[cmd.index("--kv-mib") + 1] = str(args.cpu_kv_mib)
            base = replace(base, hooks=spec.HooksSpec())
        base = replace(base, cwd=str(ROOT), command=cmd)
        return base, Path(base.command[base.command.index("--weights") + 1]), []
    from bench.e2e_gpu import gpu_spec, gpu_uuids, write_weights

    gpus = gpu_uuids()[:1]
    if not gpus:
        raise SystemExit("no GPU found (NVML); use --cpu on a machine without one")
    write_weights(work / "model.safetensors")
    return gpu_spec(work, args.kv_gib), work / "model.safetensors", gpus


async def answer(endpoint: str) -> bytes:
    status, body = await probe.http_request("GET", endpoint, "/generate", timeout_s=120)
    if status != 200:
        raise RuntimeError(f"/generate answered {status}: {body[:200]!r}")
    return body


def criu_profile(run_dir: Path) -> dict[str, Any]:
    """Where the restore's CRIU spent its time (engine/criu_profile.py), from its log when it has
    timestamps: runc always logs at -v4 (restore.log in its work dir); the host sandbox at
    `--criu-log-level`. `unlogged_s` (criu_restore less what CRIU logged) is runc's own work and
    CRIU's start for a container, CRIU's start for the host sandbox."""
    logs = sorted(run_dir.glob("criu-restore-*/restore.log")) + sorted(run_dir.glob("criu-restore-*.log"))
    prof = profile_file(logs[0]) if logs else None
    if prof is None or prof.logged_s <= 0:  # -v2: no timestamps
        return {}
    return {"logged_s": prof.logged_s, "phases_s": prof.phases_s, "slowest": prof.slowest[:5]}


async def one_round(
    d: spec.DeploymentSpec, kind: str, n: int, work: Path, gpus: list[str], criu: CriuBinary, log_level: int
) -> dict[str, Any]:
    base = work / f"{kind}-{n}"
    shutil.rmtree(base, ignore_errors=True)
    if kind == "host":  # a fresh HOME and TMPDIR (torch.compile's caches), as the container's /tmp is
        (base / "tmp").mkdir(parents=True)
        d = replace(d, env={**d.env, "HOME": str(base / "tmp"), "TMPDIR": str(base / "tmp")})
    s = time.monotonic()
    sb = await engine.launch(d, f"bench-{kind}-{n}a", gpu_uuids=gpus, run_dir=base / "run-a")
    try:
        await engine.wait_ready(sb, d.ready, cwd=d.cwd)
        ref = await answer(sb.endpoint)
        cold = time.monotonic() - s
        fr = await engine.freeze(sb, d, base / "image", keep_running=False, criu=criu)
    finally:
        await engine.stop(sb)
    s = time.monotonic()
    back, rep = await engine.restore(
        d, base / "image", f"bench-{kind}-{n}b", gpu_uuids=gpus, run_dir=base / "run-b", criu=criu,
        criu_log_level=log_level,
    )  # fmt: skip
    try:
        body = await answer(back.endpoint)
        took = time.monotonic() - s
    finally:
        await engine.stop(back)
    prof = criu_profile(base / "run-b")
    if prof:
        prof["unlogged_s"] = round(rep.timings_s["criu_restore"] - prof["logged_s"], 4)
    out = {"kind": kind, "round": n, "cold_s": round(cold, 3), "restore_first_answer_s": round(took, 3),
           "restore": rep.timings_s, "freeze": fr.timings_s, "image_bytes": fr.image_bytes,
           "answer_identical": body == ref, "criu_profile": prof}  # fmt: skip
    say(f"{kind} #{n}: cold {cold:.2f}s, restore->answer {took:.3f}s {rep.timings_s}, same: {body == ref}")
    return out


async def play(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base, weights, gpus = samples(args, work)
    image = build_layout(work / "image-build", ld_cache=not args.cpu)
    kinds = {"host": base, "oci": oci_spec(base, image, weights, gpu=bool(gpus))}
    os.environ["SNAPSCALE_SANDBOX_MOUNTS"] = ":".join(m.src for m in kinds["oci"].sandbox.mounts)
    criu = find_criu(os.environ.get("SNAPSCALE_CRIU"))
    runs: list[dict[str, Any]] = []
    for n in range(args.rounds):
        for kind in KINDS if n % 2 == 0 else KINDS[::-1]:  # neither kind always second
            runs.append(await one_round(kinds[kind], kind, n, work, gpus, criu, args.criu_log_level))
    med = {k: statistics.median(r["restore_first_answer_s"] for r in runs if r["kind"] == k) for k in KINDS}
    return {"image": image, "gpus": gpus, "cpu": args.cpu, "runs": runs, "median_restore_s": med,
            "oci_over_host": round(med["oci"] / med["host"], 3),
            "all_identical": all(r["answer_identical"] for r in runs)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/oci-sandbox-out")
    p.add_argument("--work", default="/tmp/oci-sandbox-work", help="images, run dirs, weights")
    p.add_argument("--cpu", action="store_true", help="the tiny CPU sample, for a machine without GPU")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-gib", type=int, default=4)
    p.add_argument(
        "--cpu-kv-mib", type=int, default=0,
        help="with --cpu: the sample's KV cache in MiB, kept through the freeze (no hooks), so the "
        "image holds that many pages for the restore to read (default: the quick sample's 16, dropped)",
    )  # fmt: skip
    p.add_argument(
        "--criu-log-level", type=int, default=2, choices=(2, 4),
        help="the host sandbox's CRIU log level (4: timestamps for its profile; runc always logs at 4)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root: runc, CRIU, network namespaces")
    os.environ["SNAPSCALE_SANDBOX"] = "host"  # the host-process kind runs beside the OCI one
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SNAPSCALE_STATE_DIR", str(work / "state"))  # the image store
    shutil.rmtree(work / "image-build", ignore_errors=True)
    res = asyncio.run(play(args, work))
    res["host_cgroup"] = Path("/proc/self/cgroup").read_text().splitlines()  # the host kind's too
    out.mkdir(parents=True, exist_ok=True)
    (out / "oci_sandbox.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    say(f"median restore -> first answer: host {res['median_restore_s']['host']:.3f}s, "
        f"oci {res['median_restore_s']['oci']:.3f}s (oci/host {res['oci_over_host']}); "
        f"answers identical: {res['all_identical']}")  # fmt: skip
    return 0 if res["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
