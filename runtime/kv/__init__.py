"""KV policies, one module each behind `base.LayerKV` (their knobs are declared in core/policies/);
`make_cache` builds one by name."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from core.errors import ConfigError
from core.policies import kv_dtype_name, load_plugin

from .base import CacheShape, KVCache, LayerKV, Step
from .full import FullKV
from .kivi import KiviKV
from .offload import OffloadKV
from .rag import RagKV
from .specache import SpeCacheKV

POLICIES = {"full": FullKV, "offload": OffloadKV, "kivi": KiviKV, "specache": SpeCacheKV, "rag": RagKV}

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU and float16 on CUDA.

    Why not 16-bit on CPU too: measured on the 2-core box, a 4K-context decode attention
    through SDPA takes ~6x longer in bf16 and ~10x in fp16 than in fp32 (no native 16-bit
    matmul there), so a 16-bit CPU cache would measure the converter, not the policy.
    """
    return KV_DTYPES[kv_dtype_name(name, device.type)]


def register(name: str, cls: type) -> type:
    """Enter a runtime policy (a LayerKV subclass with `build`) under its name; for policies
    shipped outside this package (their module is `policy.plugin`)."""
    POLICIES[name] = cls
    return cls


def policy_spec(name: str, kv_dtype: str = "auto", **knobs) -> SimpleNamespace:
    """A policy config built in code, with the fields a `conf/policy/*.yaml` gives."""
    return SimpleNamespace(name=name, kv_dtype=kv_dtype, **knobs)


def make_cache(policy, *, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
               capacity: int, device: torch.device, link=None) -> KVCache:
    """Build a model's KV cache from a policy config (`.name`, `.kv_dtype` and the policy's
    knobs). `link` is the host<->device copy engine (runtime/transfer.py) for policies that
    keep K/V in host memory; None = a direct copy."""
    load_plugin(policy, "kv")
    name = policy.name
    if name not in POLICIES:
        raise ConfigError(f"policy={name!r} is not known; choose one of: {', '.join(sorted(POLICIES))}")
    dtype = resolve_kv_dtype(policy.kv_dtype, device)
    shape = CacheShape(n_layers, batch, n_kv_heads, head_dim, capacity, dtype, device)
    return POLICIES[name].build(policy, shape, link)


__all__ = ["CacheShape", "KVCache", "LayerKV", "Step", "POLICIES", "make_cache", "policy_spec", "register", "resolve_kv_dtype"]
