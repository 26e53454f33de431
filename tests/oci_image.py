"""The sandbox tests' image (bench/oci_image.py builds it with umoci: no registry is reachable) with
/app/probe.py, a workload that serves what it can and cannot do; the specs mount the host's /usr
read-only for its interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import oci_image as bench_image
from snapscale.shared.bus.sandbox_spec import Mount, SandboxSpec
from snapscale.shared.bus.spec import DeploymentSpec, ReadySpec
from snapscale.shared.engine.oci.container import CAP_SYS_RESOURCE, has_cap

# CRIU reads each task's rlimits; for another uid the kernel wants CAP_SYS_RESOURCE, which the root
# of some hosts (these dev VMs, the lent GPU machines) lacks. There the checkpoint tests run the
# workload as uid 0 (still without CAP_SYS_ADMIN, its own root, seccomp); elsewhere as the default
# non-root user.
CAN_DUMP_OTHER_UIDS = has_cap(CAP_SYS_RESOURCE, Path("/proc/self/status").read_text())
DUMP_USER = "1000:1000" if CAN_DUMP_OTHER_UIDS else "0:0"

PROBE = r"""
import ctypes, json, os, sys, threading, time, http.server
count = [0]
hog = []
if os.environ.get("ALLOC_MIB"):
    for _ in range(int(os.environ["ALLOC_MIB"])):
        hog.append(bytearray(1 << 20))

def attempt(fn):
    try:
        return "ok: %s" % (fn(),)
    except Exception as e:
        return "refused: %s" % (type(e).__name__,)

def write(path):
    with open(path, "w") as f:
        f.write("x")
    return path

def probes(q):
    libc = ctypes.CDLL(None, use_errno=True)
    out = {
        "uid": os.getuid(), "gid": os.getgid(),
        "shadow": attempt(lambda: open("/etc/shadow").read()[:10]),
        "write_usr": attempt(lambda: write("/usr/snapscale-probe")),
        "write_root": attempt(lambda: write("/probe-root")),
        "write_scratch": attempt(lambda: write("/scratch/probe")),
        "mount": "refused" if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) != 0 else "ok",
        "caps": open("/proc/self/status").read().split("CapEff:")[1].split()[0],
    }
    for p in q.get("paths", []):
        out["see:" + p] = attempt(lambda: os.listdir(p))
    return out

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def answer(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/healthz":
            return self.answer("ok")
        if self.path == "/count":
            count[0] += 1
            return self.answer(count[0])
        self.send_response(404); self.end_headers()
    def do_POST(self):
        q = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/probe":
            return self.answer(probes(q))
        if self.path == "/write":
            with open(q["path"], "w") as f:
                f.write(q["data"])
            return self.answer("written")
        if self.path == "/append":  # a file kept open and grown every millisecond, from a thread
            f = open(q["path"], "a")
            def grow():
                n = 0
                while True:
                    n += 1; f.write("%d\n" % n); f.flush(); time.sleep(0.001)
            threading.Thread(target=grow, daemon=True).start()
            return self.answer("appending")
        if self.path == "/read":
            return self.answer(attempt(lambda: open(q["path"]).read()))
        if self.path == "/alloc":  # memory taken after ready, touched page by page
            for _ in range(int(q["mib"])):
                hog.append(bytearray(1 << 20))
            return self.answer(len(hog))
        self.send_response(404); self.end_headers()

print("probe up as", os.getuid(), flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def build_layout(root: Path) -> str:
    return bench_image.build_layout(root, {"probe.py": PROBE})


def probe_spec(
    name: str,
    image: str,
    *,
    user: str = "1000:1000",
    memory_mib: int = 256,
    env: dict[str, str] | None = None,
) -> DeploymentSpec:
    return DeploymentSpec(
        name=name,
        command=["/usr/bin/python3", "-I", "/app/probe.py"],
        env=env or {},
        cwd="/app",
        sandbox=SandboxSpec(
            image=image, user=user, memory_mib=memory_mib, pids=128, cpus=1.0, scratch_mib=16,
            mounts=[Mount(src="/usr", dst="/usr")],
        ),
        ready=ReadySpec(http_path="/healthz", timeout_s=30.0, interval_s=0.02),
    )  # fmt: skip


@pytest.fixture(scope="session")
def oci_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The probe image, built once a session: its `oci:<layout>@<digest>` reference."""
    return build_layout(tmp_path_factory.mktemp("oci-image"))
