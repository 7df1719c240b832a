"""The RAG chunk-reuse tables, per layer: re-rotating reused keys (`rope_rerotate`), a chunk's
K/V to and from disk (`chunk_store`, `chunk_load`, safetensors as runtime/rag/store.py writes
them) and selective prefill (`selective_prefill`: m recomputed tokens over a context of N).
Why these terms: docs/rag.md.
"""
from __future__ import annotations

import tempfile

import torch
from safetensors.torch import load_file, save_file

from ..kv import Step, make_cache
from ..model import apply_rope
from .cache_fill import random_kv
from .timing import grid


def measure_rag(args, timer, device, dtype, axes, block, cos, sin, full, progress) -> dict:
    """The four RAG tables of `axes`, on `block` (a lone layer) with its RoPE tables `cos`, `sin`."""
    D, Hkv = args.head_dim, args.n_kv_heads
    out = {}

    def rerotate(T):
        k = torch.randn(1, Hkv, T, D, device=device, dtype=dtype)
        delta = torch.full((1, T), 1000, device=device)
        c, s_ = cos[delta][:, None], sin[delta][:, None]
        return lambda: apply_rope(k, c, s_)
    out["rope_rerotate"] = grid(timer, axes["rope_rerotate"], rerotate, progress)

    tmp = tempfile.TemporaryDirectory(prefix="kvtestbed-profile-")
    path = f"{tmp.name}/chunk.safetensors"

    def store(T):
        kv = {"k": torch.randn(1, Hkv, T, D, dtype=dtype).contiguous(), "v": torch.randn(1, Hkv, T, D, dtype=dtype)}
        return lambda: save_file(kv, path)

    def load(T):
        save_file({"k": torch.randn(1, Hkv, T, D, dtype=dtype), "v": torch.randn(1, Hkv, T, D, dtype=dtype)}, path)
        return lambda: {n: t.to(device) for n, t in load_file(path).items()}
    out["chunk_store"] = grid(timer, axes["chunk_store"], store, progress)
    out["chunk_load"] = grid(timer, axes["chunk_load"], load, progress)
    tmp.cleanup()

    def selective(m, N):
        if m >= N:
            m = N // 2
        layer_ctx = N - m

        def run():
            cache = make_cache(full, n_layers=1, batch=1, n_kv_heads=Hkv, head_dim=D, capacity=N, device=device)
            k, v = random_kv(1, args, layer_ctx, cache[0].dtype, device)
            zero = torch.zeros(1, dtype=torch.long, device=device)
            cache[0].load(k, v, Step(0, layer_ctx, zero, torch.zeros(1, layer_ctx, dtype=torch.long, device=device)))
            x = torch.randn(1, m, args.dim, device=device, dtype=dtype)
            pos = torch.arange(layer_ctx, N, device=device)[None]
            block(x, cos[pos][:, :, None], sin[pos][:, :, None], cache[0], Step(layer_ctx, m, zero, pos))
        return run
    out["selective_prefill"] = grid(timer, axes["selective_prefill"], selective, progress)
    out["selective_prefill"]["note"] = ("m new tokens attending over N (the cache holds N - m reused tokens); "
                                        "includes loading the reused K/V into the layer cache")
    return out

