"""Roofline profiles: the measured schema, derived from published peaks for GPUs that are not here.

Each kernel's time is max(FLOPs / (peak FLOP/s x compute efficiency), bytes / (HBM bandwidth x
memory efficiency)) plus its kernel launches; transfers are latency + bytes / (PCIe rate x
link efficiency). The efficiencies are stated in the file (`provenance.assumptions`): they are
typical achieved fractions, not measurements, and a measured profile of the same GPU replaces
the whole file (`compare` prints how far the two are apart, per table).
"""
from __future__ import annotations

import datetime as _dt

import torch

from ..errors import ConfigError
from ..provenance import git_revision
from .measure import kernel_axes, model_args
from .schema import SCHEMA_VERSION, table

# Peaks from the vendors' datasheets: dense FP16/BF16 tensor-core FLOP/s (no sparsity), HBM/GDDR
# bandwidth, memory, PCIe generation x width. PCIe per-direction rate after 128b/130b coding.
GPUS = {
    "h100-sxm": dict(name="NVIDIA H100 SXM5 80GB", flops=989e12, hbm=3.35e12, memory=80e9, pcie=(5, 16),
                     source="NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOPS dense BF16, 3.35 TB/s)"),
    "h100-pcie": dict(name="NVIDIA H100 PCIe 80GB", flops=756e12, hbm=2.0e12, memory=80e9, pcie=(5, 16),
                      source="NVIDIA H100 Tensor Core GPU datasheet (PCIe: 756 TFLOPS dense BF16, 2.0 TB/s)"),
    "h200": dict(name="NVIDIA H200 SXM 141GB", flops=989e12, hbm=4.8e12, memory=141e9, pcie=(5, 16),
                 source="NVIDIA H200 Tensor Core GPU datasheet (989 TFLOPS dense BF16, 4.8 TB/s, 141 GB)"),
    "a100": dict(name="NVIDIA A100 SXM4 80GB", flops=312e12, hbm=2.039e12, memory=80e9, pcie=(4, 16),
                 source="NVIDIA A100 Tensor Core GPU datasheet (312 TFLOPS dense BF16, 2,039 GB/s)"),
    "a6000": dict(name="NVIDIA RTX A6000", flops=154.8e12, hbm=768e9, memory=48e9, pcie=(4, 16),
                  source="NVIDIA RTX A6000 datasheet (309.7 TFLOPS tensor with sparsity -> 154.8 dense, 768 GB/s)"),
    "l40s": dict(name="NVIDIA L40S", flops=362e12, hbm=864e9, memory=48e9, pcie=(4, 16),
                 source="NVIDIA L40S datasheet (733 TFLOPS FP16 with sparsity -> 362 dense, 864 GB/s)"),
}
PCIE_LANE = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9}

ASSUMPTIONS = {
    "compute_efficiency": 0.6,      # of dense tensor-core peak reached by large GEMMs
    "memory_efficiency": 0.8,       # of HBM peak reached by streaming kernels
    "pcie_efficiency": 0.85,        # pinned H2D/D2H of large copies
    "pageable_factor": 0.5,         # pageable copies are staged through a bounce buffer
    "pcie_latency_s": 10e-6,
    "launch_s": 5e-6,               # per kernel launch (eager PyTorch)
    "step_overhead_s": 300e-6,      # Python engine loop per decode step, outside the layers
    "layer_glue_s": 150e-6,         # Python between a layer's kernels (eager PyTorch, ~15 launches)
    "host_gather_bytes_per_s": 10e9,  # CPU index_select into pinned staging
    "runtime_overhead_bytes": 1.5e9,  # CUDA context, cuBLAS workspace, allocator slack
    "disk_bytes_per_s": 2e9,        # NVMe read/write of chunk K/V files
    "bytes_per_weight": 2, "bytes_per_kv": 2,
}


def _kernel(flops: float, nbytes: float, launches: int, gpu: dict, a=ASSUMPTIONS) -> float:
    return max(flops / (gpu["flops"] * a["compute_efficiency"]), nbytes / (gpu["hbm"] * a["memory_efficiency"])) \
        + launches * a["launch_s"]


def model_tables(args, gpu: dict, kivi=dict(bits=2, group_size=64, residual=64)) -> dict:
    a = ASSUMPTIONS
    grids = kernel_axes(args, quick=False, device=torch.device("cuda"))   # the measured GPU grids
    w, kvb = a["bytes_per_weight"], a["bytes_per_kv"]
    D, H, Hkv, dim, ffn = args.head_dim, args.n_heads, args.n_kv_heads, args.dim, args.ffn_dim
    p_attn = dim * (H + 2 * Hkv) * D + H * D * dim
    p_mlp = 3 * dim * ffn
    lowbit = (kivi["bits"] + 32 / kivi["group_size"]) / 16     # of fp16 bytes

    def per(name, f):
        (axis, xs), = grids[name].items()
        return table({axis: xs}, [f(x) for x in xs])

    def per2(name, f):
        (a1, xs), (a2, ys) = grids[name].items()
        return table({a1: xs, a2: ys}, [[f(x, y) for y in ys] for x in xs])

    pcie = PCIE_LANE[gpu["pcie"][0]] * gpu["pcie"][1] * a["pcie_efficiency"]

    kv_row = Hkv * D * kvb
    return {
        "prefill_layer": per("prefill_layer", lambda T: _kernel(
            2 * T * (p_attn + p_mlp) + 2 * H * D * T * T, (p_attn + p_mlp) * w + 12 * T * dim * w + 2 * T * kv_row, 15, gpu)),
        "decode_attention_full": per2("decode_attention_full", lambda B, c: _kernel(4 * B * H * D * c, 2 * B * c * kv_row, 4, gpu)),
        "decode_attention_kivi": per2("decode_attention_kivi", lambda B, c: _kernel(
            8 * B * H * D * c, 2 * B * c * kv_row * lowbit, 10, gpu)),
        "score_topk": per2("score_topk", lambda B, c: _kernel(
            4 * B * H * D * c, B * c * kv_row * lowbit + 8 * B * Hkv * c, 8, gpu)),
        "gather_replace": per2("gather_replace", lambda B, k: 2 * B * k * kv_row / pcie + a["pcie_latency_s"]
            + 2 * B * k * kv_row / a["host_gather_bytes_per_s"] + _kernel(4 * B * H * D * k, 4 * B * k * kv_row, 6, gpu)),
        "quantize": per("quantize", lambda T: _kernel(10 * T * Hkv * D, T * kv_row * (1 + lowbit), 6, gpu)),
        "projections": per("projections", lambda T: _kernel(2 * T * p_attn, p_attn * w + 4 * T * dim * w, 2, gpu)),
        "mlp": per("mlp", lambda T: _kernel(2 * T * p_mlp, p_mlp * w + 6 * T * ffn * w, 4, gpu)),
        "lm_head_sample": per("lm_head_sample", lambda B: _kernel(2 * B * dim * args.vocab_size,
                                                         dim * args.vocab_size * w + B * args.vocab_size * 4, 3, gpu)),
        "step_overhead": table({"batch": [1, 4]}, [a["step_overhead_s"]] * 2),
        "decode_layer": table({"batch": [1, 4]}, [_kernel(2 * B * (p_attn + p_mlp), (p_attn + p_mlp) * w, 15, gpu)
                                                  + a["layer_glue_s"] for B in (1, 4)]),
        "rope_rerotate": per("rope_rerotate", lambda T: _kernel(6 * T * kv_row, 2 * T * kv_row, 4, gpu)),
        "chunk_store": per("chunk_store", lambda T: 2 * T * kv_row / pcie + 2 * T * kv_row / a["disk_bytes_per_s"]),
        "chunk_load": per("chunk_load", lambda T: 2 * T * kv_row / pcie + 2 * T * kv_row / a["disk_bytes_per_s"]),
        "selective_prefill": per2("selective_prefill", lambda m, N: _kernel(
            2 * m * (p_attn + p_mlp) + 4 * H * D * m * N, (p_attn + p_mlp) * w + 2 * N * kv_row, 15, gpu)),
    }


def transfer_tables(gpu: dict) -> dict:
    a = ASSUMPTIONS
    rate = PCIE_LANE[gpu["pcie"][0]] * gpu["pcie"][1] * a["pcie_efficiency"]
    sizes = [4096 << i for i in range(19)]                          # 4 KiB .. 1 GiB
    pinned = [a["pcie_latency_s"] + n / rate for n in sizes]
    pageable = [a["pcie_latency_s"] + n / (rate * a["pageable_factor"]) for n in sizes]
    rows = [16, 64, 256, 1024, 4096, 16384, 65536]
    row_bytes = 128 * 2
    gather = [a["pcie_latency_s"] + r * row_bytes / rate + r * row_bytes / a["host_gather_bytes_per_s"] for r in rows]
    t = {"h2d_pinned": table({"bytes": sizes}, pinned), "d2h_pinned": table({"bytes": sizes}, pinned),
         "h2d_pageable": table({"bytes": sizes}, pageable), "d2h_pageable": table({"bytes": sizes}, pageable),
         "gather": {**table({"rows": rows}, gather), "row_bytes": row_bytes},
         "overlap": {"gemm_slowdown_with_copy": 1.0, "copy_slowdown_with_gemm": 1.0,
                     "note": "separate copy engines: assumed no interference"}}
    return t


def profile(name: str, models: list[str]) -> dict:
    if name not in GPUS:
        raise ConfigError(f"--roofline {name}: unknown GPU; known: {', '.join(GPUS)}")
    gpu = GPUS[name]
    gen, width = gpu["pcie"]
    out_models = {}
    for m in models:
        args = model_args(m)
        weights = (args.n_layers * (args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
                                    + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.ffn_dim)
                   + args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)) * ASSUMPTIONS["bytes_per_weight"]
        act = 2048 * args.dim * 2 * 20
        avail = gpu["memory"] - ASSUMPTIONS["runtime_overhead_bytes"] - weights - act
        out_models[m] = {
            "shape": {**vars(args), "head_dim": args.head_dim},
            "weight_dtype": "float16", "kv_dtype": "float16",
            "policy_knobs": {"kivi": dict(bits=2, group_size=64, residual=64), "specache": dict(bits=2, group_size=64, residual=64, k=64)},
            "kernels": model_tables(args, gpu),
            "memory": {"total_bytes": int(gpu["memory"]), "weights_bytes": int(weights),
                       "activation_peak_bytes": int(act), "runtime_overhead_bytes": int(ASSUMPTIONS["runtime_overhead_bytes"]),
                       "kv_available_bytes": int(max(avail, 0))},
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "device": {"name": gpu["name"], "type": "cuda", "memory_bytes": int(gpu["memory"]), "slug": f"roofline-{name}",
                   "pcie": {"gen": gen, "width": width, "theoretical_bytes_per_s": PCIE_LANE[gen] * width},
                   "peak_flops": gpu["flops"], "hbm_bytes_per_s": gpu["hbm"]},
        "provenance": {"kind": "roofline", "sources": [gpu["source"], "PCI-SIG: per-lane rates after 128b/130b coding"],
                       "assumptions": ASSUMPTIONS, "git_revision": git_revision(),
                       "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": f"python -m runtime.profile --roofline {name} --model {' '.join(models)}"},
        "transfers": transfer_tables(gpu),
        "models": out_models,
    }
