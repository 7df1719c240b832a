"""Roofline profiles: the measured schema, derived from published peaks for GPUs that are not here.

Each kernel's time is max(FLOPs / (peak FLOP/s x compute efficiency), bytes / (HBM bandwidth x
memory efficiency)) plus its kernel launches; transfers are latency + bytes / (PCIe rate x
link efficiency). The efficiencies are stated in the file (`provenance.assumptions`): they are
typical achieved fractions, not measurements, and a measured profile of the same GPU replaces
the whole file (`--compare` prints how far the two are apart, per table). Why: docs/profiles.md.
"""
from __future__ import annotations

import datetime as _dt

import torch

from core.errors import ConfigError
from core.provenance import git_revision
from .grids import kernel_axes, model_args
from core.profile.schema import SCHEMA_VERSION, table

from core.profile.analytic import ASSUMPTIONS, GPUS, PCIE_LANE, Roofline, Shape  # noqa: F401  (GPUS, PCIE_LANE re-exported)


def model_tables(args, gpu: dict, kivi=dict(bits=2, group_size=64, residual=64)) -> dict:
    """The roofline formulas (core/profile/analytic.py) tabulated on the measured GPU grids."""
    grids = kernel_axes(args, quick=False, device=torch.device("cuda"))   # the measured GPU grids
    r = Roofline.of_gpu(gpu, Shape.of({**vars(args), "head_dim": args.head_dim}, kv_elem=ASSUMPTIONS["bytes_per_kv"]))
    bits, gs = kivi["bits"], kivi["group_size"]

    def per(name, f):
        (axis, xs), = grids[name].items()
        return table({axis: xs}, [f(x) for x in xs])

    def per2(name, f):
        (a1, xs), (a2, ys) = grids[name].items()
        return table({a1: xs, a2: ys}, [[f(x, y) for y in ys] for x in xs])

    return {
        "prefill_layer": per("prefill_layer", r.prefill_layer),
        "decode_attention_full": per2("decode_attention_full", r.decode_attention_full),
        "decode_attention_kivi": per2("decode_attention_kivi", lambda B, c: r.decode_attention_kivi(B, c, bits=bits, group_size=gs)),
        "score_topk": per2("score_topk", lambda B, c: r.score_topk(B, c, bits=bits, group_size=gs)),
        "gather_replace": per2("gather_replace", r.gather_replace),
        "quantize": per("quantize", lambda T: r.quantize(T, bits=bits, group_size=gs)),
        "projections": per("projections", r.projections),
        "mlp": per("mlp", r.mlp),
        "lm_head_sample": per("lm_head_sample", r.lm_head_sample),
        "step_overhead": table({"batch": [1, 4]}, [r.step_overhead(B) for B in (1, 4)]),
        "decode_layer": table({"batch": [1, 4]}, [r.decode_layer(B) for B in (1, 4)]),
        "rope_rerotate": per("rope_rerotate", r.rope_rerotate),
        "chunk_store": per("chunk_store", r.chunk_store),
        "chunk_load": per("chunk_load", r.chunk_load),
        "selective_prefill": per2("selective_prefill", r.selective_prefill),
    }


def transfer_tables(gpu: dict) -> dict:
    a = ASSUMPTIONS
    r = Roofline.of_gpu(gpu, Shape(1, 1, 1, 128, 1, 1))
    sizes = [4096 << i for i in range(19)]                          # 4 KiB .. 1 GiB
    rows = [16, 64, 256, 1024, 4096, 16384, 65536]
    row_bytes = 128 * 2
    t = {"h2d_pinned": table({"bytes": sizes}, [r.h2d_pinned(n) for n in sizes]),
         "d2h_pinned": table({"bytes": sizes}, [r.d2h_pinned(n) for n in sizes]),
         "h2d_pageable": table({"bytes": sizes}, [r.h2d_pageable(n) for n in sizes]),
         "d2h_pageable": table({"bytes": sizes}, [r.d2h_pageable(n) for n in sizes]),
         "gather": {**table({"rows": rows}, [r.gather_host(n * row_bytes) for n in rows]), "row_bytes": row_bytes},
         "gather_device": {**table({"rows": rows}, [r.gather_device(n * row_bytes) for n in rows]), "row_bytes": row_bytes},
         "overlap": {"gemm_slowdown_with_copy": 1.0, "copy_slowdown_with_gemm": 1.0,
                     "note": "separate copy engines: assumed no interference"}}
    del a
    return t


def profile(name: str, models: list[str]) -> dict:
    if name not in GPUS:
        raise ConfigError(f"--roofline {name}: unknown GPU; known: {', '.join(GPUS)}")
    gpu = GPUS[name]
    gen, width = gpu["pcie"]
    out_models = {}
    for m in models:
        args = model_args(m)
        r = Roofline.of_gpu(gpu, Shape.of({**vars(args), "head_dim": args.head_dim}))
        weights, act, avail = r.s.weights_bytes(), r.activation_bytes(), r.kv_available_bytes()
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
