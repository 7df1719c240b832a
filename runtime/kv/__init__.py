"""KV policies, one module each behind `base.LayerKV` (their knobs are declared in core/policies/);
`make_cache` builds a model's cache from a policy's checked declaration. `POLICIES` finds
`runtime/kv/<name>.py` by its name (docs/policies.md)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from core.policies import PolicyConfig, kv_dtype_name, load_plugin, spec_of

from .base import POLICIES, CacheShape, KVCache, LayerKV, Step, register

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU and float16 on CUDA.

    Why not 16-bit on CPU too: measured on the 2-core box, a 4K-context decode attention
    through SDPA takes ~6x longer in bf16 and ~10x in fp16 than in fp32 (no native 16-bit
    matmul there), so a 16-bit CPU cache would measure the converter, not the policy.
    """
    return KV_DTYPES[kv_dtype_name(name, device.type)]


def policy_spec(name: str, kv_dtype: str = "auto", **knobs) -> SimpleNamespace:
    """A policy config built in code, with the fields a `conf/policy/*.yaml` gives."""
    return SimpleNamespace(name=name, kv_dtype=kv_dtype, **knobs)


def make_cache(policy, *, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
               capacity: int, device: torch.device, link=None) -> KVCache:
    """Build a model's KV cache from a policy's checked declaration (core.policies PolicyConfig,
    as core/checks.py returns it), or from a config (`.name`, `.kv_dtype`, the knobs: a
    DictConfig, dict or namespace), which is built into one and checked here, once. `link` is
    the host<->device copy engine (runtime/transfer.py) for policies that keep K/V in host
    memory; None = a direct copy."""
    if isinstance(policy, PolicyConfig):
        spec = policy
        spec.check_head_dim(head_dim)
    else:
        spec = spec_of(policy, head_dim)
    load_plugin(policy, "kv")
    cls = POLICIES.lookup(spec.name)
    dtype = resolve_kv_dtype(spec.kv_dtype, device)
    shape = CacheShape(n_layers, batch, n_kv_heads, head_dim, capacity, dtype, device)
    return cls.build(spec, shape, link)


__all__ = ["CacheShape", "KVCache", "LayerKV", "Step", "POLICIES", "make_cache", "policy_spec", "register", "resolve_kv_dtype"]
