"""This machine's speed index: three short probes through the runtime's kernels, taken around
measurements so that a drifting shared VM can be told from a slow prediction. Identity and the
cache root are in core/machine.py (the simulator needs them too) and are re-exported here.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from core.machine import (CACHE_ENV, cache_root, cache_sizes, fingerprint, machine_facts,  # noqa: F401
                          resolve_device, this_fingerprint)


def _median_time(fn, device, reps: int) -> float:
    from .engine import sync

    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def speed_index(device: torch.device | str = "cpu", shape: dict | None = None, reps: int = 9) -> dict:
    """Three probes (medians of `reps` runs): `gemm_s` a (64 x dim) @ (dim x (n_heads + 2 n_kv_heads) head_dim)
    projection, `memcpy_s` 32 MiB host to device (CPU: a host memcpy), `attention_s` one decode
    attention (batch 1, 1K context, the model's heads). `index` = 1 / geometric mean of the three
    (probes per second: larger is faster). `shape`: ModelArgs fields (default: the shipped model's)."""
    import torch.nn.functional as F

    from .model import ModelArgs

    device = torch.device(device)
    a = {**vars(ModelArgs()), **(shape or {})}
    dim, H, Hkv = int(a["dim"]), int(a["n_heads"]), int(a["n_kv_heads"])
    D = int(a.get("head_dim") or dim // H)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = torch.randn(64, dim, device=device, dtype=dtype)
        w = torch.randn(dim, (H + 2 * Hkv) * D, device=device, dtype=dtype)
        gemm = _median_time(lambda: x @ w, device, reps)
        n = 32 << 20
        src = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        memcpy = _median_time(lambda: dst.copy_(src, non_blocking=device.type == "cuda"), device, reps)
        q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
        k = torch.randn(1, H, 1024, D, device=device, dtype=dtype)
        attn = _median_time(lambda: F.scaled_dot_product_attention(q, k, k), device, reps)
    secs = np.array([gemm, memcpy, attn])
    return {"gemm_s": gemm, "memcpy_s": memcpy, "attention_s": attn,
            "index": float(1.0 / np.exp(np.log(secs).mean())), "probe_wall_s": time.perf_counter() - t0,
            "shape": {"dim": dim, "n_heads": H, "n_kv_heads": Hkv, "head_dim": D}, "reps": reps}
