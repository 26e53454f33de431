"""The sample sandbox: an HTTP model server with a realistic warm-up and the two snapscale hooks.

Warm-up: import torch, load (or first write) weights from a file, warm up; on GPU also torch.compile,
a captured CUDA graph and a KV-cache tensor. `/generate` answers deterministically, so an answer
before a freeze and after a restore can be compared byte for byte. `--preset none` skips torch
(a fast stand-in for tests of the engine's failure paths). `--weights-outside` loads the weights
through `snapscale.workload`: released in before_freeze when the engine offers to carry them, filled
back in after_restore from where the engine says (docs/weights.md).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import signal
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from snapscale.workload import WeightsError, hooks
from snapscale.workload.errors import ProtocolError

T0 = time.time()
PROMPT_LEN = 32
NEW_TOKENS = 8


def log(msg: str) -> None:
    print(f"{time.time():.3f} {msg}", flush=True)


class Model:
    """Everything the server keeps warm. Only built when a torch preset is asked for."""

    def __init__(self, args: argparse.Namespace) -> None:
        t: dict[str, float] = {}
        import torch

        from examples.sample_server.model import PRESETS, Decoder

        self.torch = torch
        t["import_s"] = time.time() - T0
        self.device = torch.device(args.device)
        # The KV cache may live on another card: one process that uses two GPUs (bench/two_gpu.py).
        self.kv_device = torch.device(args.kv_device or args.device)
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.kv_mib = args.kv_mib
        cfg = PRESETS[args.preset]
        s = time.time()
        self.weights: Any = None
        if getattr(args, "weights_outside", False):  # callers may build args without it
            from snapscale.workload import Weights

            if not args.weights.endswith(".safetensors"):
                raise SystemExit(f"--weights-outside reads safetensors; --weights is {args.weights}")
            write_weights(args.weights, cfg, args.seed, self.dtype, self.device)
            self.weights = Weights.load(args.weights, str(self.device))
            sd = self.weights.tensors
        else:
            sd = load_or_write_weights(args.weights, cfg, args.seed, self.dtype, self.device)
        with torch.device("meta"):
            model = Decoder(cfg)
        model.load_state_dict(sd, assign=True)
        self.model = model.to(self.device).eval()
        del sd
        self.sync()
        t["weights_s"] = time.time() - s
        g = torch.Generator().manual_seed(args.seed + 1)
        with torch.inference_mode():
            # An inference tensor, like every input `generate` makes: a compiled forward guards on
            # that, and one made outside would have the first request compile a second variant.
            self.prompt = torch.randint(0, cfg.vocab, (1, PROMPT_LEN), generator=g).to(self.device)
        s = time.time()
        self.fwd = torch.compile(self.model) if args.compile else self.model
        with torch.inference_mode():
            for _ in range(2):
                self.fwd(self.prompt)
        self.sync()
        t["compile_warmup_s"] = time.time() - s
        self.graph = None
        if args.graph:
            s = time.time()
            self.static_in = self.prompt.clone()
            with torch.inference_mode():
                stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.model(self.static_in)
                torch.cuda.current_stream().wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.static_out = self.model(self.static_in)
            self.sync()
            t["cuda_graph_s"] = time.time() - s
        s = time.time()
        self.kv: Any = None
        self.alloc_kv()
        t["kv_cache_s"] = time.time() - s
        if args.warmup:
            # A real server's last step before it says ready: requests through the serving path,
            # so the first user's request finds nothing left to compile or allocate.
            s = time.time()
            for _ in range(args.warmup):
                self.generate()
            t["warmup_s"] = time.time() - s
        self.timings = t

    def sync(self) -> None:
        for d in {self.device, self.kv_device}:
            if d.type == "cuda":
                self.torch.cuda.synchronize(d)

    def alloc_kv(self) -> None:
        """The KV cache: big, and rebuilt identically from a seed after a restore."""
        torch = self.torch
        n = self.kv_mib * (1 << 20) // 2
        g = torch.Generator(device=self.kv_device).manual_seed(1234)
        self.kv = torch.empty(n, dtype=torch.bfloat16, device=self.kv_device)
        self.kv.normal_(generator=g)
        self.sync()

    def drop_kv(self) -> None:
        self.kv = None
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def generate(self) -> dict[str, Any]:
        if self.weights is not None and self.weights.released:
            raise WeightsReleased  # the model would read unmapped memory
        torch = self.torch
        with torch.inference_mode():
            logits = self.fwd(self.prompt)
            x = self.prompt.clone()
            tokens = []
            for _ in range(NEW_TOKENS):
                if self.graph is not None:
                    self.static_in.copy_(x)
                    self.graph.replay()
                    out = self.static_out
                else:
                    out = self.fwd(x)
                tok = out[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(tok))
                x = torch.cat([x[:, 1:], tok], dim=1)
            kv = None if self.kv is None else float(self.kv[: 1 << 20].float().sum()).hex()
            self.sync()
            last = logits[0, -4:].float().cpu().flatten().tolist()
            return {
                "tokens": tokens,
                "logits_sha256": hashlib.sha256(struct.pack(f"<{len(last)}d", *last)).hexdigest(),
                "kv_sum": kv,
                "device": str(self.device),
                "kv_device": str(self.kv_device),
            }


class WeightsReleased(Exception):
    """/generate between before_freeze and after_restore: the weights' memory is given back."""


def write_weights(path: str, cfg: Any, seed: int, dtype: Any, device: Any) -> None:
    """Deterministic random weights at `path`, unless a file is there already."""
    if os.path.exists(path):
        return
    import torch

    from examples.sample_server.model import random_state_dict

    sd = random_state_dict(cfg, seed, dtype, device=str(device))
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    log(f"wrote random weights to {path}")


def release_weights(model: Any, body: bytes) -> dict[str, Any]:
    """before_freeze: release the weights when the engine offers to carry them; our answer's share."""
    weights = getattr(model, "weights", None)
    if weights is None or not hooks.read_freeze_request(body) or weights.released:
        return {}
    rec = weights.release()
    log(f"before_freeze: {rec.nbytes} bytes of weights released, addresses kept")
    return hooks.freeze_answer(rec)


def restore_weights(model: Any, body: bytes) -> None:
    """after_restore: fill released weights back from where the engine says."""
    weights = getattr(model, "weights", None)
    source = hooks.read_restore_request(body)  # a bad body is refused even when nothing is released
    if weights is None or not weights.released:
        return
    rep = weights.restore(source)
    model.timings.update({f"weights_{k}": v for k, v in weights.timings.items()})
    where = source or "their files"
    log(f"after_restore: weights filled from {where}: {rep.bytes} bytes in {rep.seconds:.3f}s")


def load_or_write_weights(path: str, cfg: Any, seed: int, dtype: Any, device: Any) -> dict[str, Any]:
    import torch

    write_weights(path, cfg, seed, dtype, device)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors: dict[str, Any] = load_file(path, device=str(device))
        return tensors
    loaded: dict[str, Any] = torch.load(path, map_location=device, weights_only=True, mmap=False)
    return loaded


class Light:
    """No torch: a deterministic answer and a KV-cache stand-in, for fast engine tests."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.kv_mib = args.kv_mib
        self.kv: bytearray | None = None
        self.counter = 0
        self.alloc_kv()
        self.timings = {"import_s": time.time() - T0}

    def alloc_kv(self) -> None:
        self.kv = bytearray(hashlib.sha256(b"kv").digest() * (self.kv_mib * (1 << 20) // 32))

    def drop_kv(self) -> None:
        self.kv = None

    def generate(self) -> dict[str, Any]:
        kv = None if self.kv is None else hashlib.sha256(self.kv[: 1 << 20]).hexdigest()
        return {
            "tokens": list(hashlib.sha256(b"prompt").digest()[:NEW_TOKENS]),
            "kv_sum": kv,
            "device": "none",
        }


def make_handler(model: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, sort_keys=True).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _generate(self) -> None:
            try:
                self._send(200, model.generate())
            except WeightsReleased:
                self._send(503, {"error": "weights released for a freeze; after_restore brings them back"})

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"ok": True})
            elif self.path == "/generate":
                self._generate()
            elif self.path == "/timings":
                self._send(200, model.timings)
            else:
                self._send(404, {"error": f"no {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                self._post(body)
            except WeightsError as e:  # a body we cannot act on (400), or weights not filled (500)
                log(f"{self.path}: {e}")
                self._send(400 if isinstance(e, ProtocolError) else 500, {"error": str(e)})

        def _post(self, body: bytes) -> None:
            if self.path == "/generate":
                self._generate()
            elif self.path == "/hooks/before_freeze":
                hooks.read_freeze_request(body)  # refuse a bad body before dropping anything
                model.drop_kv()
                log("before_freeze: KV cache dropped")
                self._send(200, {"kv": False, **release_weights(model, body)})
            elif self.path == "/hooks/after_restore":
                restore_weights(model, body)
                if model.kv is None:
                    model.alloc_kv()
                log("after_restore: KV cache allocated")
                self._send(200, {"kv": True})
            elif self.path == "/hooks/fail":
                self._send(500, {"error": "this hook always fails"})
            elif self.path == "/hooks/hang":
                time.sleep(3600)  # for tests of a hook's deadline
            else:
                self._send(404, {"error": f"no {self.path}"})

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per probe would flood the replica's log

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--preset",
        default="tiny",
        help="tiny | llama-55m | llama-0.8b | llama-3b | llama-8b | none (no torch)",
    )
    p.add_argument("--weights", default="/tmp/snapscale-sample-tiny.pt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-device", default=None, help="where the KV cache lives (default: --device)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--graph", action="store_true", help="capture a CUDA graph of the forward pass")
    p.add_argument("--kv-mib", type=int, default=16)
    p.add_argument("--warmup", type=int, default=0, help="generate passes before ready")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="ignored; lets a test find its processes")
    p.add_argument(
        "--weights-outside",
        action="store_true",
        help="weights in a snapscale.workload arena (a .safetensors --weights): released before a freeze"
        " when the engine offers to carry them, filled back after a restore",
    )
    args = p.parse_args(argv)
    # PID 1 of its namespace: SIGTERM is ignored unless handled.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.preset == "none":
        model: Any = Light(args)
    else:
        import torch

        torch.set_num_threads(args.threads)
        model = Model(args)
    server = HTTPServer(("0.0.0.0", args.port), make_handler(model))
    model.timings["total_to_ready_s"] = time.time() - T0
    log("ready " + json.dumps(model.timings, sort_keys=True))
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
