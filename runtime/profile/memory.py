"""A model's `memory` section: bytes left for KV after the whole model's weights, the
activation peak of a prefill and (CUDA) the runtime's own overhead; measured, not total x 0.9.
Why: docs/profiles.md.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from ..engine import PeakMemory, cpu_peak_rss, left_pad, prefill, sync
from ..kv import make_cache
from ..loaders import random_init
from ..model import ModelArgs, Transformer


def measure_memory(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> dict:
    """Memory left for KV after the whole model's weights, the activation peak of a prefill
    (measured on the first layers and scaled by nothing: activations do not grow with depth)
    and the runtime's own overhead. Not total x 0.9."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free0, total = torch.cuda.mem_get_info(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        small = ModelArgs(**{**vars(args), "n_layers": 1})
        m = random_init(small, 0, dtype, device)
        per_layer = sum(p.numel() * p.element_size() for p in m.layers.parameters())
        other = sum(p.numel() * p.element_size() for p in m.parameters()) - per_layer
        weights = other + per_layer * args.n_layers
        T = min(2048, args.max_seq_len)
        _prefill_once(m, T, device)
        act_peak = torch.cuda.max_memory_allocated(device) - base - (other + per_layer)
        runtime_overhead = total - free0 - base    # CUDA context, cuBLAS workspaces, allocator slack
        del m
        torch.cuda.empty_cache()
        avail = total - runtime_overhead - base - weights - act_peak
        return {"total_bytes": int(total), "weights_bytes": int(weights), "activation_peak_bytes": int(act_peak),
                "runtime_overhead_bytes": int(runtime_overhead), "kv_available_bytes": int(max(avail, 0)),
                "activation_probe_tokens": T}
    import psutil

    with torch.device("meta"):
        meta = Transformer(args)
    weights = sum(p.numel() for p in meta.parameters()) * torch.finfo(dtype).bits // 8
    small = ModelArgs(**{**vars(args), "n_layers": 1})
    m = random_init(small, 0, dtype, device)
    T = min(2048, args.max_seq_len)
    rss0 = cpu_peak_rss()
    with PeakMemory(device) as pm:
        _prefill_once(m, T, device)
    act_peak = max(pm.peak - rss0, 0)
    vm = psutil.virtual_memory()
    avail = vm.available - weights - act_peak
    return {"total_bytes": int(vm.total), "available_now_bytes": int(vm.available), "weights_bytes": int(weights),
            "activation_peak_bytes": int(act_peak), "kv_available_bytes": int(max(avail, 0)),
            "activation_probe_tokens": T}


def _prefill_once(m, T, device):
    tokens, pad = left_pad([[5] * T], m.args.pad_id, device)
    cache = make_cache(NS(name="full", kv_dtype="auto"), n_layers=m.args.n_layers, batch=1,
                       n_kv_heads=m.args.n_kv_heads, head_dim=m.args.head_dim, capacity=T, device=device)
    prefill(m, cache, tokens, pad)
    sync(device)
