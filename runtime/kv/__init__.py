"""KV policies, one module each behind `base.LayerKV`; `make_cache` builds one by name."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import KVCache, LayerKV, Step
from .full import FullKV

POLICIES = {"full": FullKV}

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU and float16 on CUDA.

    Why not 16-bit on CPU too: measured on the 2-core box, a 4K-context decode attention
    through SDPA takes ~6x longer in bf16 and ~10x in fp16 than in fp32 (no native 16-bit
    matmul there), so a 16-bit CPU cache would measure the converter, not the policy.
    """
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in KV_DTYPES:
        raise ConfigError(f"policy.kv_dtype={name!r} is not known; use one of auto, {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


def make_cache(policy, *, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
               capacity: int, device: torch.device) -> KVCache:
    """Build a model's KV cache from a policy config (anything with `.name` and `.kv_dtype`)."""
    name = policy.name
    if name not in POLICIES:
        raise ConfigError(f"policy={name!r} is not known; choose one of: {', '.join(sorted(POLICIES))}")
    dtype = resolve_kv_dtype(policy.kv_dtype, device)
    cls = POLICIES[name]
    layers = [cls(batch, n_kv_heads, head_dim, capacity, dtype, device) for _ in range(n_layers)]
    return KVCache(layers, name)


__all__ = ["KVCache", "LayerKV", "Step", "POLICIES", "make_cache", "resolve_kv_dtype"]
