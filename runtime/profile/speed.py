"""This machine's speed index: three short probes through the runtime's kernels, taken around
measurements so that a drifting shared VM can be told from a slow prediction. The machine's
identity and the cache root are core/machine.py. Why an index and how it is read: docs/profiles.md.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .timing import Timer


def speed_index(device: torch.device | str = "cpu", shape: dict | None = None, reps: int = 9) -> dict:
    """Three probes (medians of `reps` runs after one untimed): `gemm_s` a (64 x dim) @ (dim x (n_heads
    + 2 n_kv_heads) head_dim) projection, `memcpy_s` 32 MiB host to device (CPU: a host memcpy),
    `attention_s` one decode attention (batch 1, 1K context, the model's heads). `index` = 1 /
    geometric mean of the three (probes per second: larger is faster). `shape`: ModelArgs fields
    (default: the shipped model's)."""
    import torch.nn.functional as F

    from ..model import ModelArgs

    device = torch.device(device)
    median = lambda fn: Timer(device, repeats=reps, warmup=1, budget_s=math.inf)(fn)[1]  # noqa: E731
    a = {**vars(ModelArgs()), **(shape or {})}
    dim, H, Hkv = int(a["dim"]), int(a["n_heads"]), int(a["n_kv_heads"])
    D = int(a.get("head_dim") or dim // H)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = torch.randn(64, dim, device=device, dtype=dtype)
        w = torch.randn(dim, (H + 2 * Hkv) * D, device=device, dtype=dtype)
        gemm = median(lambda: x @ w)
        n = 32 << 20
        src = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda")
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        memcpy = median(lambda: dst.copy_(src, non_blocking=device.type == "cuda"))
        q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
        k = torch.randn(1, H, 1024, D, device=device, dtype=dtype)
        attn = median(lambda: F.scaled_dot_product_attention(q, k, k))
    secs = np.array([gemm, memcpy, attn])
    return {"gemm_s": gemm, "memcpy_s": memcpy, "attention_s": attn,
            "index": float(1.0 / np.exp(np.log(secs).mean())), "probe_wall_s": time.perf_counter() - t0,
            "shape": {"dim": dim, "n_heads": H, "n_kv_heads": Hkv, "head_dim": D}, "reps": reps}


# The model probe: two points of a profile's whole-model tables timed again, as the profile timed
# them. The speed index's probes sit in the CPU cache; a decode step streams the model's weights
# from DRAM, so on a shared VM the two drift apart (measured on the 2-core VM: the index back at
# its profile's value while the shipped model's decode steps ran 1.3x slower than profiled, its
# prefills 1.1x). analysis.validate corrects a prediction by these (docs/validation.md, "Drift").
PROBE_PREFILL_TOKENS = 256       # a length runtime/profile/whole_model.py times in every profile


def model_probe(m, reps: int = 3) -> dict:
    """Per-layer seconds of the whole model `m` (random weights of a profile's model shape and
    depth): `decode_layer_s`, the layer phase / depth of batch-1 decode steps after a 32-token
    prefill (the profile's decode_layer at (1, its first context), timed by the same function);
    `prefill_layer_s`, the layer phase / depth of a PROBE_PREFILL_TOKENS-token prefill (the
    profile's prefill_layer there); each the median of `reps` runs (a decode run: 7 timed steps);
    `probe_wall_s` (~3 s for the shipped model on the 2-core VM)."""
    from ..phases import PhaseTimer
    from .whole_model import _decode_step_phases, whole_prefill

    a, device = m.args, m.device
    t0 = time.perf_counter()
    dtype = next(m.parameters()).dtype
    dec = _decode_step_phases(a, 1, device, dtype, "auto", reps, m=m)["layer"] / a.n_layers
    run = whole_prefill(m, PROBE_PREFILL_TOKENS, PhaseTimer(device))
    run()                                       # warms up, as whole_model_prefill's first run
    pre = float(np.median([run() for _ in range(reps)])) / a.n_layers
    return {"decode_layer_s": dec, "prefill_layer_s": pre, "probe_wall_s": time.perf_counter() - t0}
