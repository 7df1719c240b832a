"""One pass of the target's first n layers over a prompt that records what every `policy=rag`
signal reads (see runtime/rag/selectors.py). Its own module: the chunk store traces a chunk
alone for its features, and the selectors read traces."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kv import make_cache, policy_spec
from ..kv.base import Step
from ..model import Transformer, apply_rope

ChunkKV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v (1, H_kv, n, D), as runtime.rag.store's


def _q(block, x, cos, sin):
    """The block's rotated queries (B, H, T, D) of hidden states x (B, T, dim); cos/sin head-major."""
    att = block.attention
    H, D = att.n_heads, att.head_dim
    B, T, _ = x.shape
    q = att.wqkv(block.attention_norm(x))[..., : H * D]
    return apply_rope(q.reshape(B, T, H, D).transpose(1, 2), cos, sin)


@dataclass
class Trace:
    """What `trace` records, per traced layer (rows = layers 0..n-1)."""
    n_ctx: int
    norms: torch.Tensor                  # (n, T) float32: hidden-state L2 norm after each block
    dev: torch.Tensor | None = None      # (n, N) ||K - K_reused||_2 + ||V - V_reused||_2 (reused given)
    attn: torch.Tensor | None = None     # (n, N) question rows' attention mass on each context token
    kv: ChunkKV | None = None            # per layer: the prefill's K/V (1, H_kv, T, D) (keep_kv)

    @property
    def n_layers(self) -> int:
        return self.norms.shape[0]


def trace(model: Transformer, prompt: list[int], n_layers: int, n_ctx: int, reused: ChunkKV | None = None,
          attn: bool = False, keep_kv: bool = False) -> Trace:
    """The first `n_layers` blocks of the model over the whole prompt (causal, full attention:
    the target's own prefill when n_layers = L); see the module docstring. reused: the placed
    chunk K/V (positions 0..n_ctx-1), for the deviation; attn: record the question's mass;
    keep_kv: keep every layer's K/V (what `engine.prefill_once` gives, op for op)."""
    T, N = len(prompt), n_ctx
    dev = model.device
    tokens = torch.tensor([prompt], dtype=torch.long, device=dev)
    cache = make_cache(policy_spec("full"), n_layers=n_layers, batch=1, n_kv_heads=model.args.n_kv_heads,
                       head_dim=model.args.head_dim, capacity=T, device=dev)
    pos = torch.arange(T, device=dev)
    step = Step(start=0, n_new=T, pad=torch.zeros(1, dtype=torch.long, device=dev), positions=pos[None])
    cos, sin = model.rope_cos[pos][None, :, None], model.rope_sin[pos][None, :, None]  # (1, T, 1, D/2): Block's layout
    norms = torch.zeros(n_layers, T, dtype=torch.float32, device=dev)
    devs = torch.zeros(n_layers, N, dtype=torch.float32, device=dev) if reused is not None else None
    mass = torch.zeros(n_layers, N, dtype=torch.float32, device=dev) if attn else None
    if attn and T > N:
        qpos = pos[N:]
        qcos, qsin = model.rope_cos[qpos][None, None], model.rope_sin[qpos][None, None]     # head-major, for _qkv
        allowed = (pos[None, :] <= qpos[:, None])[None, None]                           # (1, 1, Q, T)
    with torch.inference_mode():
        x = model.tok_embeddings(tokens)
        for li, (block, kv) in enumerate(zip(model.layers[:n_layers], cache.layers)):
            x_in = x
            x = block(x, cos, sin, kv, step)
            norms[li] = x[0].float().norm(dim=-1)
            K, V = kv.k[:, :, :T], kv.v[:, :, :T]
            if devs is not None and N:
                k0, v0 = reused[li]
                devs[li] = ((K[:, :, :N].float() - k0.float()).square().sum(dim=(1, 3)).sqrt()[0]
                            + (V[:, :, :N].float() - v0.float()).square().sum(dim=(1, 3)).sqrt()[0])
            if mass is not None and T > N and N:
                q = _q(block, x_in[:, N:], qcos, qsin)                              # (1, H, Q, hd)
                G = q.shape[1] // K.shape[1]
                Kh = K.float().repeat_interleave(G, dim=1)                          # head h reads KV head h // G
                s = (q.float() @ Kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
                p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)  # (1, H, Q, T)
                mass[li] = p[0, :, :, :N].mean(dim=(0, 1))
    kept = [(layer.k[:, :, :T].clone(), layer.v[:, :, :T].clone()) for layer in cache.layers] if keep_kv else None
    return Trace(n_ctx=N, norms=norms, dev=devs, attn=mass, kv=kept)


