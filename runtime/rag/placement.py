"""Chunks placed in a prompt: keys stored at positions 0..n-1 re-rotated to their offset
(R(o) R(p) = R(p + o) with `runtime.model.apply_rope`), and the direct prefill at an offset
that the re-rotation is tested against."""
from __future__ import annotations

import torch

from .. import phases
from ..kv import make_cache, policy_spec
from ..kv.base import Step
from ..model import Transformer, apply_rope
from .store import ChunkKV, ChunkStore


def rerotate(model: Transformer, k: torch.Tensor, offset: int) -> torch.Tensor:
    """Keys (B, H_kv, n, D) rotated at positions 0..n-1 -> the same keys at offset..offset+n-1."""
    if offset == 0:
        return k
    cos = model.rope_cos[offset].view(1, 1, 1, -1)
    sin = model.rope_sin[offset].view(1, 1, 1, -1)
    return apply_rope(k, cos, sin)


def prefill_at(model: Transformer, ids: list[int], offset: int, kv_dtype: str = "auto") -> ChunkKV:
    """A direct prefill of `ids` alone at positions offset..offset+n-1 (the re-rotation reference)."""
    n = len(ids)
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    cache = make_cache(policy_spec("full", kv_dtype), n_layers=model.args.n_layers, batch=1, n_kv_heads=model.args.n_kv_heads,
                       head_dim=model.args.head_dim, capacity=n, device=model.device)
    pad = torch.zeros(1, dtype=torch.long, device=model.device)
    pos = torch.arange(offset, offset + n, device=model.device)[None]
    model(tokens, cache, Step(start=0, n_new=n, pad=pad, positions=pos), last_only=True)
    return [(layer.k[:, :, :n].clone(), layer.v[:, :, :n].clone()) for layer in cache.layers]


def placed_kv(model: Transformer, store: ChunkStore, chunks: list[list[int]]) -> ChunkKV:
    """The chunks' stored K/V concatenated, each re-rotated to its offset in the prompt."""
    per_layer: list[tuple[list, list]] = [([], []) for _ in range(model.args.n_layers)]
    off = 0
    for ids in chunks:
        with phases.suspended():              # a store miss prefills the chunk: not this prompt's layers
            kv = store.get(ids)
        for i, (k, v) in enumerate(kv):
            phases.lap("load")                # rag_prefill's phases: getting the chunk's K/V is `load`,
            per_layer[i][0].append(rerotate(model, k, off))
            phases.lap("rerotate")            # moving its keys to their offset `rerotate`
            per_layer[i][1].append(v)
        off += len(ids)
    return [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in per_layer]


def _qkv(block, x, cos, sin):
    att = block.attention
    H, Hkv, D = att.n_heads, att.n_kv_heads, att.head_dim
    B, T, _ = x.shape
    q, k, v = att.wqkv(block.attention_norm(x)).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
