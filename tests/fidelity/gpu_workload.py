"""The GPU fidelity workload: an API server process and an engine process, each with its own CUDA
context and its own tensors on the GPU, talking over a loopback TCP connection they keep open
(the shape of a model server's front end and its engine). Standard library and torch only.

`GET /answer`: the API server asks the engine over the connection for a digest of its tensors'
product, computes its own, and answers both with both PIDs as JSON. `GET /healthz` once both are up.
Run by bench/fidelity_gpu.py as a sandbox: `python3 tests/fidelity/gpu_workload.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from workload import serve  # tests/fidelity/workload.py, beside this file

N = 2048  # a 2048 x 2048 float32 matrix per process: 16 MiB of GPU memory each
DEVICE = os.environ.get("FIDELITY_DEVICE", "cuda")  # "cpu": the same shape without a GPU


def resident(seed: int) -> Any:
    """Tensors made once at start and kept on the GPU: a restore must bring their contents back."""
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(N, N, device=DEVICE, generator=g)


def digest(x: Any) -> str:
    """A digest of a computation on the resident tensor, on the GPU, copied back as bytes."""
    y = (x @ x).sum(dim=0)
    return hashlib.sha256(repr(y.cpu().tolist()).encode()).hexdigest()[:32]  # no numpy needed


def engine() -> None:
    """The engine process: its own CUDA context, one client (the API server), line protocol; its
    port goes to the API server on its stdout (a pipe)."""
    x = resident(seed=2)
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    with conn, conn.makefile("rw") as io:
        for line in io:
            if line.strip() == "digest":
                io.write(f"{os.getpid()} {digest(x)}\n")
                io.flush()


class Api:
    def __init__(self) -> None:
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--engine"], stdout=subprocess.PIPE, text=True
        )
        self.x = resident(seed=1)  # the API server's own context and tensors
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line.strip():
            raise SystemExit(f"the engine process exited {self.child.wait()} before it listened")
        self.conn = socket.create_connection(("127.0.0.1", int(line)))  # kept open: frozen established
        self.io = self.conn.makefile("rw")
        self.lock = threading.Lock()

    def answer(self) -> dict[str, Any]:
        with self.lock:
            self.io.write("digest\n")
            self.io.flush()
            engine_pid, engine_digest = self.io.readline().split()
        return {
            "api": {"pid": os.getpid(), "digest": digest(self.x)},
            "engine": {"pid": int(engine_pid), "digest": engine_digest},
        }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine"]:
        engine()
    else:
        api = Api()
        serve(8000, {"/answer": lambda _q: json.dumps(api.answer()).encode()})
