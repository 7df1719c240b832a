"""Shape-true costs: roofline costs computed for the shape asked, measured tables
refused beyond their shape or grid, host memory as a resource, both gathers, a separate draft.
References are hand-computed here from the shapes and the profiles' stated peaks."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.validate import compose_config
from core.errors import ConfigError
from simulator.hardware import solve
from simulator.policies import Full
from simulator.run import build_sim, simulate

ROOT = Path(__file__).resolve().parents[1]
A6000 = json.loads((ROOT / "profiles/roofline-a6000.json").read_text())
ASSUME = A6000["provenance"]["assumptions"]
HBM = A6000["device"]["hbm_bytes_per_s"] * ASSUME["memory_efficiency"]
PCIE = A6000["device"]["pcie"]["theoretical_bytes_per_s"] * ASSUME["pcie_efficiency"]


def sim(*overrides, tmp=None):
    return build_sim(compose_config("simulate", list(overrides)))[0]


def test_roofline_formulas_import_without_torch():
    code = ("import sys, core.profile.analytic, simulator.costs; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_attention_time_scales_with_kv_bytes_read():
    """model.args.n_kv_heads: 32 -> 8 reads 4x fewer K/V bytes; the attention time (less its
    launches) drops 4x, and the whole step by exactly the layers' attention difference."""
    B, ctx = 8, 4096
    t = {}
    for h in (32, 8):
        s = sim("hardware=a6000", "model=llama7b_shape", f"model.args.n_kv_heads={h}")
        attn = s.costs.table("decode_attention_full")(B, ctx)
        kv_bytes = 2 * B * ctx * h * 128 * 2                           # K and V, 16-bit, one layer
        assert attn == pytest.approx(kv_bytes / HBM + 4 * ASSUME["launch_s"], rel=1e-12)
        t[h] = (attn, solve(Full().decode_graph(s.costs, s.shape, B, ctx)).seconds, s.shape.n_layers)
    launch = 4 * ASSUME["launch_s"]
    assert (t[32][0] - launch) / (t[8][0] - launch) == pytest.approx(4.0, rel=1e-12)
    # GQA changes the q/k/v projection's weights too: k and v shrink from 32 to 8 heads
    dw = 2 * 4096 * (32 - 8) * 128 * 2 / HBM                          # bytes of the K and V weights saved
    assert t[32][1] - t[8][1] == pytest.approx(32 * (t[32][0] - t[8][0] + dw), rel=1e-9)


def test_32k_and_batch_256_are_computed_not_extrapolated(tmp_path):
    r = simulate(compose_config("simulate", ["hardware=a6000", "model=mistral7b_shape", "workload.batch=1",
                                             "workload.prompt_len=32640", "workload.gen_len=8",
                                             f"results_dir={tmp_path}"]))
    assert r["extrapolated"] == []
    # weights + K/V at 32K over the A6000's bandwidth (a ~29 ms floor), plus overheads
    weights = (32 * (4096 * 48 * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336) + 32000 * 4096) * 2
    kv = 32 * 2 * 32648 * 8 * 128 * 2
    assert (weights + kv) / 768e9 < r["tpot_s"] < 1.3 * (weights + kv) / HBM
    s = sim("hardware=a6000", "model=mistral7b_shape")
    assert solve(Full().decode_graph(s.costs, s.shape, 256, 4096)).seconds > 0


def test_measured_shape_mismatch_refused_or_recorded(tmp_path):
    base = ["hardware=cpu", "model=smollm2", "workload.batch=1", "workload.prompt_len=256", "workload.gen_len=4",
            f"results_dir={tmp_path}"]
    with pytest.raises(ConfigError) as e:
        sim(*base, "+model.args.n_kv_heads=1")
    msg = str(e.value)
    assert "n_kv_heads=1" in msg and "python -m runtime.profile --model smollm2" in msg and "\n" not in msg
    r = simulate(compose_config("simulate", [*base, "+model.args.n_kv_heads=1", "allow_extrapolation=true"]))
    assert r["extrapolated"] == ["shape:n_kv_heads"]


def test_measured_grid_margin(tmp_path):
    """The CPU profile's decode_layer is measured up to batch 4: batch 8 (2x) is read, batch 9
    is refused naming the table and axis, or recorded with allow_extrapolation."""
    base = ["hardware=cpu", "model=smollm2", "workload.prompt_len=256", "workload.gen_len=4",
            f"results_dir={tmp_path}"]
    assert simulate(compose_config("simulate", [*base, "workload.batch=8"]))["extrapolated"] == []
    with pytest.raises(ConfigError, match=r"batch=9 is beyond models.smollm2.kernels.\w+'s measured grid "
                                          r"\(last point 4.*python -m runtime.profile --model smollm2"):
        simulate(compose_config("simulate", [*base, "workload.batch=9"]))
    r = simulate(compose_config("simulate", [*base, "workload.batch=9", "allow_extrapolation=true"]))
    assert "models.smollm2.kernels.decode_layer:batch" in r["extrapolated"]


def test_host_memory_bounds_admission(tmp_path):
    """SpeCache keeps every token's 16-bit K/V on the host: 40 requests of 4096 + 64 tokens need
    40 x 32 layers x 2 x 4160 x 8 x 128 x 2 bytes; a host of 10 requests' worth admits 10."""
    per = 32 * 2 * 4160 * 8 * 128 * 2
    over = ["hardware=a6000", "model=mistral7b_shape", "policy=specache", "workload.batch=40",
            "workload.prompt_len=4096", "workload.gen_len=64", f"results_dir={tmp_path}"]
    free = simulate(compose_config("simulate", over))
    assert free["max_batch_reached"] > 10
    r = simulate(compose_config("simulate", [*over, f"hardware.host_memory_bytes={10 * per + per // 2}"]))
    assert r["max_batch_reached"] == 10 and r["requests"] == 40
    with pytest.raises(ConfigError, match="hardware.host_memory_bytes"):
        simulate(compose_config("simulate", [*over, f"hardware.host_memory_bytes={per - 1}"]))
    # full keeps nothing on the host: the limit does not bind it
    full = simulate(compose_config("simulate", [*over, "policy=full", "hardware.host_memory_bytes=1"]))
    assert full["max_batch_reached"] == free["max_batch_reached"] or full["max_batch_reached"] > 1


def test_twin_costs_both_gathers():
    s = sim("hardware=a6000", "model=mistral7b_shape", "policy=specache")
    c = s.costs
    n = 2 * 16 * 64 * s.shape.kv_row                     # batch 16, k 64, K and V
    lat = ASSUME["pcie_latency_s"]
    assert c.gather(n, "device") == pytest.approx(lat + n / PCIE, rel=1e-12)
    assert c.gather(n, "host") == pytest.approx(lat + n / PCIE + n / ASSUME["host_gather_bytes_per_s"], rel=1e-12)
    with pytest.raises(ConfigError, match="policy.gather='gpu'"):
        sim("hardware=a6000", "model=mistral7b_shape", "policy=specache", "policy.gather=gpu")
    # a CPU profile emulates the device gather with the same index_select: same cost
    cpu = sim("hardware=cpu", "model=smollm2", "policy=specache").costs
    assert cpu.gather(1 << 16, "device") == cpu.gather(1 << 16, "host")


def test_separate_draft_costed_by_its_shape():
    over = ["hardware=a100", "model=llama3_8b_shape", "policy=rag", "workload=rag", "workload.prompt_len=3104",
            "policy.selector=draft", "policy.draft_layers=16"]
    s = sim(*over, "policy.draft_model=llama32_1b_shape")
    d = s.policy.draft_costs
    # Llama-3.2-1B: dim 2048, 32 heads of 64, 8 KV heads, ffn 8192, tied 128256 x 2048 embeddings
    p_layer = 2048 * 48 * 64 + 32 * 64 * 2048 + 3 * 2048 * 8192
    a100 = json.loads((ROOT / "profiles/roofline-a100.json").read_text())
    flops = a100["device"]["peak_flops"] * ASSUME["compute_efficiency"]
    T = 3104
    want = (2 * T * p_layer + 2 * 32 * 64 * T * T) / flops + 15 * ASSUME["launch_s"]   # compute-bound at 3K tokens
    assert d.table("prefill_layer")(T) == pytest.approx(want, rel=1e-12)
    alone = sim(*over)
    draft_weights = (16 * p_layer + 128256 * 2048) * 2
    assert alone.kv_capacity - s.kv_capacity == draft_weights
    with pytest.raises(ConfigError, match=r"draft_layers=17 must be in \[1, 16\]"):
        sim(*over[:-1], "policy.draft_layers=17", "policy.draft_model=llama32_1b_shape")


@pytest.mark.parametrize("model,heads,kv_heads,layers", [("mistral7b_shape", 32, 8, 32), ("llama3_8b_shape", 32, 8, 32),
                                                          ("llama13b_shape", 40, 40, 40), ("llama32_1b_shape", 32, 8, 16)])
def test_presets_compose_for_runtime_bench(model, heads, kv_heads, layers):
    from runtime.model import ModelArgs

    cfg = compose_config("bench", [f"model={model}"])
    assert cfg.model.source == "random" and cfg.model.args.n_layers == 4 and cfg.model.full_n_layers == layers
    a = ModelArgs.from_dict(dict(cfg.model.args))
    assert (a.n_heads, a.n_kv_heads) == (heads, kv_heads)


@pytest.mark.parametrize("model", ["mistral7b_shape", "llama32_1b_shape"])
def test_presets_run_in_runtime_bench_on_cpu(model, tmp_path):
    """Random init through runtime.bench: a few tokens (one layer here to spare the CPU box's
    memory; the preset's default is 4)."""
    from runtime.bench import run as bench_run

    cfg = compose_config("bench", [f"model={model}", "model.args.n_layers=1", "workload.batch=1",
                                   "workload.prompt_len=8", "workload.gen_len=2", "warmup=false", "progress=false",
                                   f"results_dir={tmp_path}"])
    rec = bench_run(cfg)
    assert rec["throughput_tok_s"] > 0 and not math.isnan(rec["ttft_s"])
