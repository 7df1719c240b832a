"""A lone layer's KV cache filled with `ctx` tokens of random K/V (the values do not change a
kernel's time), the starting point of the attention and RAG kernel timings.
"""
from __future__ import annotations

import torch

from ..kv import Step, make_cache


def random_kv(batch, args, ctx, dtype, device):
    """K and V of shape (batch, n_kv_heads, ctx, head_dim), the same random values (seed 0)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(batch, args.n_kv_heads, ctx, args.head_dim, generator=g).to(device=device, dtype=dtype)
    return k, k.clone()


def layer_with_context(policy, args, B, ctx, dtype, device):
    """Layer 0 of a one-layer cache of `policy` holding `ctx` tokens per row (room for 64 more)."""
    cache = make_cache(policy, n_layers=1, batch=B, n_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                       capacity=ctx + 64, device=device)
    k, v = random_kv(B, args, ctx, cache[0].dtype, device)
    step = Step(0, ctx, torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, ctx, dtype=torch.long, device=device))
    cache[0].load(k, v, step)
    cache.advance(step)
    return cache[0]
