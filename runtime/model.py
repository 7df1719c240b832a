"""A Llama-family decoder in plain PyTorch: `ModelArgs`, the blocks, `Transformer`.

RMSNorm, RoPE (base from the model), grouped-query attention, SwiGLU MLP, optionally tied
embeddings: enough for Llama 2/3, Mistral and SmolLM2. Attention reads and writes K/V only
through a `runtime.kv.LayerKV`, so every KV policy plugs in without touching this file.
Weights come from `runtime/loaders.py`; the design is in docs/architecture.md.

RoPE convention, project-wide: the *half-split* pairing of HF transformers (`rotate_half`):
dimension i is rotated together with i + D/2. Anything that re-rotates keys later (RAG chunk
reuse) must call `apply_rope` from here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import ConfigError
from . import phases
from .kv.base import KVCache, Step


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_base: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 2

    def __post_init__(self):
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"model.args.{f}={getattr(self, f)} must be positive")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(f"model.args.dim={self.dim} must split into n_heads={self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.args.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model.args has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the weights' dtype: fp16 squares overflow
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, n_pos: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_pos, head_dim/2), float32.

    Angles are computed in float64: pos * inv_freq in float32 is off by ~pos * 6e-8 rad, about
    5e-4 rad at 8K positions, enough to move logits of long contexts.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by per-token angles; half-split pairing. x (B, H, T, D) with cos/sin
    (B, 1, T, D/2), or any layout whose cos/sin broadcast, e.g. x (B, T, H, D), cos (B, T, 1, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # one GEMM for q, k and v: rows [q | k | v]
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, kv, step: Step):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if cos.shape[1] != T:
            raise ValueError(f"cos/sin must be token-major (B, T, 1, D/2); got {tuple(cos.shape)} for T={T}")
        qk, v = self.wqkv(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
        # q and k rotated in one pass, token-major (cos, sin: (B, T, 1, D/2)); the same
        # elementwise ops as rotating each, half the kernel launches
        qk = apply_rope(qk.view(B, T, H + Hkv, D), cos, sin)
        q = qk[:, :, :H].transpose(1, 2)              # (B, H, T, D)
        k = qk[:, :, H:].transpose(1, 2)              # (B, H_kv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        phases.lap("projections")                     # the block's attention_norm + wqkv + RoPE
        # the policy laps its own named phases (fetch, back, store, score) inside attend, so
        # what this lap gets is the attention proper
        o = kv.attend(q, k, v, step)                  # (B, H, T, D)
        phases.lap("attention")
        o = self.wo(o.transpose(1, 2).reshape(B, T, H * D))
        phases.lap("projections")
        return o


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one GEMM."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, kv, step):
        # the layer's parts (runtime/phases.py): each lap takes the time since the previous one,
        # so the norms and residual adds land in `other` and `layer` = the sum of the four parts
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, step)
        return self.mlp_residual(h)

    def mlp_residual(self, h):
        """h + MLP(norm(h)): the norm and the residual add timed as `other`, the MLP as `mlp`
        (also RAG's selective prefill, runtime/rag/prefill.py, after its own attention)."""
        hn = self.ffn_norm(h)
        phases.lap("other")
        m = self.feed_forward(hn)
        phases.lap("mlp")
        out = h + m
        phases.lap("other")
        return out


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, step: Step, last_only: bool = False):
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (prefill needs only
        the last position's logits: the vocab projection of every prompt token is the single
        biggest waste of a naive prefill)."""
        x = self.tok_embeddings(tokens)                        # (B, T, dim)
        cos = self.rope_cos[step.positions][:, :, None]        # (B, T, 1, D/2): token-major
        sin = self.rope_sin[step.positions][:, :, None]
        phases.lap("overhead")                                 # embedding, RoPE tables (and the engine's glue before)
        for i, (layer, kv) in enumerate(zip(self.layers, cache.layers)):
            since = phases.mark()
            x = layer(x, cos, sin, kv, step)
            phases.group(f"block{i}", since)                   # the timeline's span of this layer
        cache.advance(step)
        phases.lap("overhead")                                 # advance counts the tokens held: bookkeeping
        if last_only:
            x = x[:, -1:]
        logits = self.output(self.norm(x)).float()
        phases.lap("lm_head")
        return logits


# ----------------------------------------------------------------------------- sizes

def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(args: ModelArgs, bytes_per_el: float) -> float:
    """K and V of one token across all layers."""
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * bytes_per_el
