"""Physics of the roofline costs, for every roofline profile and every model-shape preset.

The references are computed here from the GPUs' published peaks and the shapes' parameter
counts, independently of core/profile/analytic.py:
- a decode step never beats (weights + K/V bytes) / HBM bandwidth;
- a prefill never beats its GEMM FLOPs / peak FLOP/s;
- a copy or gather never beats its bytes / the PCIe link's theoretical rate;
- a full-cache decode step at batch >= 8 stays within 1.5x of the memory bound plus the
  profile's own stated launch, glue and step overheads.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from analysis.validate import compose_config
from simulator.hardware import solve
from simulator.policies import Full, Kivi, Specache
from simulator.run import build_sim

ROOT = Path(__file__).resolve().parents[1]
GPUS = ["h100-sxm", "h100-pcie", "h200", "a100", "a6000", "l40s"]
PRESETS = ["llama7b_shape", "mistral7b_shape", "llama3_8b_shape", "llama13b_shape", "llama32_1b_shape"]
# published peaks, written out again here: (dense 16-bit FLOP/s, memory bytes/s, PCIe gen, lanes)
PEAKS = {"h100-sxm": (989e12, 3.35e12, 5, 16), "h100-pcie": (756e12, 2.0e12, 5, 16), "h200": (989e12, 4.8e12, 5, 16),
         "a100": (312e12, 2.039e12, 4, 16), "a6000": (154.8e12, 768e9, 4, 16), "l40s": (362e12, 864e9, 4, 16)}
LANE = {4: 16e9 * 128 / 130 / 8, 5: 32e9 * 128 / 130 / 8}    # bytes/s per lane after 128b/130b coding


def preset(name):
    c = OmegaConf.load(ROOT / "conf/model" / f"{name}.yaml")
    a = c.args
    D = a.dim // a.n_heads
    per_layer = a.dim * (a.n_heads + 2 * a.n_kv_heads) * D + a.n_heads * D * a.dim + 3 * a.dim * a.ffn_dim
    return dict(L=int(c.full_n_layers), Hkv=a.n_kv_heads, D=D, per_layer=per_layer, dim=a.dim, vocab=a.vocab_size,
                max_seq=a.max_seq_len)


def sim_for(gpu, model, **over):
    cfg = compose_config("simulate", [f"hardware={gpu}", f"model={model}", *[f"{k}={v}" for k, v in over.items()]])
    return build_sim(cfg)[0]


def points(p):
    return [(b, c) for b in (1, 8, 64) for c in (1024, 8192, 32768) if c < p["max_seq"]]


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model", PRESETS)
def test_decode_prefill_copy_never_beat_the_roofs(gpu, model):
    flops, hbm, gen, lanes = PEAKS[gpu]
    pcie = LANE[gen] * lanes
    p = preset(model)
    sim = sim_for(gpu, model)
    c, s = sim.costs, sim.shape
    assert s.n_layers == p["L"] and s.n_kv_heads == p["Hkv"] and s.head_dim == p["D"]
    weights = (p["L"] * p["per_layer"] + p["vocab"] * p["dim"]) * 2       # every layer + the LM head, 16-bit
    for B, ctx in points(p):
        kv = p["L"] * 2 * B * ctx * p["Hkv"] * p["D"] * 2
        full = solve(Full().decode_graph(c, s, B, ctx)).seconds
        assert full >= (weights + kv) / hbm, (B, ctx)
        for pol in (Kivi(bits=2), Kivi(bits=1, group_size=32), Specache(k=64), Specache(k=64, gather="device")):
            lowbit = kv * (pol.bits + 32 / pol.group_size) / 16
            assert solve(pol.decode_graph(c, s, B, ctx)).seconds >= (weights + lowbit) / hbm, (pol, B, ctx)
    for T in (16, 512, 4096, min(32768, p["max_seq"])):
        gemm = 2 * T * p["L"] * p["per_layer"]
        assert solve(Full().prefill_graph(c, s, [T])).seconds >= gemm / flops, T
    for n in (4096, 1 << 20, 1 << 30):
        for f in (c.h2d, c.d2h, lambda n: c.gather(n, "host"), lambda n: c.gather(n, "device")):
            assert f(n) >= n / pcie


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model", PRESETS)
def test_full_decode_within_1_5x_of_memory_bound_plus_stated_overheads(gpu, model):
    _, hbm, _, _ = PEAKS[gpu]
    a = json.loads((ROOT / f"profiles/roofline-{gpu}.json").read_text())["provenance"]["assumptions"]
    p = preset(model)
    sim = sim_for(gpu, model)
    c, s = sim.costs, sim.shape
    weights = (p["L"] * p["per_layer"] + p["vocab"] * p["dim"]) * 2
    # the profile's stated overheads: per layer its glue and its kernels' launches (15 for the
    # layer's GEMMs and norms, 4 for attention), per step the engine loop and the LM head's 3
    overheads = p["L"] * (a["layer_glue_s"] + 19 * a["launch_s"]) + a["step_overhead_s"] + 3 * a["launch_s"]
    for B in (8, 16, 32):
        for ctx in (4096, 8192):
            if ctx >= p["max_seq"]:
                continue
            kv = p["L"] * 2 * B * ctx * p["Hkv"] * p["D"] * 2
            bound = (weights + kv) / hbm
            step = solve(Full().decode_graph(c, s, B, ctx)).seconds
            assert bound <= step <= 1.5 * bound + overheads, (B, ctx, step / (bound + overheads))
