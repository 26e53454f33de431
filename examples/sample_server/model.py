"""A Llama-shaped decoder in plain torch (no transformers), so the sample runs on any torch install.

Presets: `tiny` (CPU CI, warms in a few seconds), `llama-0.8b` (GPU bench: 0.84 B params in bf16),
and for the size sweep `llama-3b` (3.6 B: Llama 3.2 3B's shape, embeddings untied) and `llama-8b`
(8.0 B: Llama 3 8B's shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int


PRESETS = {
    "tiny": Config(vocab=512, hidden=64, inter=172, layers=2, heads=4, kv_heads=2),
    # The CPU demo's model: big enough that loading and compiling it take a real server's time.
    "llama-55m": Config(vocab=8192, hidden=512, inter=1408, layers=16, heads=8, kv_heads=4),
    "llama-0.8b": Config(vocab=32000, hidden=2048, inter=5632, layers=16, heads=32, kv_heads=4),
    "llama-3b": Config(vocab=128256, hidden=3072, inter=8192, layers=28, heads=24, kv_heads=8),
    "llama-8b": Config(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        hd = c.hidden // c.heads
        self.ln1 = RMSNorm(c.hidden)
        self.q = nn.Linear(c.hidden, c.heads * hd, bias=False)
        self.k = nn.Linear(c.hidden, c.kv_heads * hd, bias=False)
        self.v = nn.Linear(c.hidden, c.kv_heads * hd, bias=False)
        self.o = nn.Linear(c.heads * hd, c.hidden, bias=False)
        self.ln2 = RMSNorm(c.hidden)
        self.gate = nn.Linear(c.hidden, c.inter, bias=False)
        self.up = nn.Linear(c.hidden, c.inter, bias=False)
        self.down = nn.Linear(c.inter, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.c
        hd = c.hidden // c.heads
        h = self.ln1(x)
        q = self.q(h).view(b, t, c.heads, hd).transpose(1, 2)
        k = self.k(h).view(b, t, c.kv_heads, hd).transpose(1, 2)
        v = self.v(h).view(b, t, c.kv_heads, hd).transpose(1, 2)
        rep = c.heads // c.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, c.heads * hd))
        h = self.ln2(x)
        out: torch.Tensor = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return out


class Decoder(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits


def random_state_dict(
    c: Config, seed: int, dtype: torch.dtype, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Deterministic random weights (a stand-in for a downloaded model), made on `device`, kept on CPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Decoder(c).state_dict().items()}
    out = {}
    for k, shape in shapes.items():
        if k.endswith("weight") and len(shape) == 1:
            out[k] = torch.ones(shape, dtype=dtype)
        else:
            w = torch.randn(shape, generator=g, device=device) / math.sqrt(shape[-1])
            out[k] = w.to(dtype).cpu()
    return out
