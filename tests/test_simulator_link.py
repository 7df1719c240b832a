"""How the simulator runs copies, against hand-computed step times (simulator/copies.py link_kind).

A CPU box without link emulation copies on the compute thread (a step is the plain sum of its
ops); with `hardware.link.gbps` one worker thread carries both directions beside compute (a
copy costs latency + bytes / bandwidth, the deadline rule of runtime/transfer.py); a GPU
profile keeps separate H2D and D2H engines.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from simulator.costs import Costs, ModelShape
from simulator.hardware import solve
from simulator.policies import Offload, Specache

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
GPU = ROOT / "profiles/roofline-h100-sxm.json"
SHAPE = ModelShape(n_layers=30, n_kv_heads=3, head_dim=64, kv_dtype="float32")


def costs(path=CPU, model="smollm2", gbps=None, latency_us=0.0) -> Costs:
    link = (gbps * 1e9, latency_us * 1e-6) if gbps else None
    return Costs.load(path, model, allow_extrapolation=True, link=link)


@pytest.mark.parametrize("policy", [Offload(), Specache(k=64, prefetch=True), Specache(k=64, prefetch=False)],
                         ids=["offload", "specache", "specache-noprefetch"])
def test_direct_link_is_serial(policy):
    c = costs()
    assert c.link_kind == "direct" and c.gemm_slowdown == 1.0
    ops = policy.decode_graph(c, SHAPE, 2, 1024)
    assert {op.engine for op in ops} == {"compute"}
    assert solve(ops).seconds == pytest.approx(sum(op.seconds for op in ops), rel=1e-12)


def test_emulated_link_copy_cost_is_the_deadline_rule():
    c = costs(gbps=2.0, latency_us=10)
    assert c.link_kind == "emulated"
    n = 3 * 2 ** 20
    assert c.h2d(n) == pytest.approx(10e-6 + n / 2e9, rel=1e-12)
    assert c.d2h(n) == pytest.approx(10e-6 + n / 2e9, rel=1e-12)
    assert c.engine("h2d") == c.engine("d2h") == "h2d"       # one FIFO worker for both directions


def test_emulated_offload_is_link_bound_on_a_slow_link_and_compute_bound_on_a_fast_one():
    B, ctx = 1, 2048
    fetch_bytes = 2 * B * ctx * SHAPE.kv_row

    def split(c):
        ops = Offload().decode_graph(c, SHAPE, B, ctx)
        compute = sum(op.seconds for op in ops if op.engine == "compute")
        link = sum(op.seconds for op in ops if op.engine != "compute")
        return solve(ops).seconds, compute, link

    step, compute, link = split(costs(gbps=0.05))
    # every fetch and write-back crosses the one link: the step cannot beat it, and overlap
    # hides at most the whole compute behind it
    assert link == pytest.approx(SHAPE.n_layers * (fetch_bytes + 2 * B * SHAPE.kv_row) / 0.05e9, rel=1e-9)
    assert link <= step <= link + compute
    assert step > 0.9 * link                                   # link-bound
    step, compute, link = split(costs(gbps=1e4))
    assert link < 0.01 * compute and step == pytest.approx(compute, rel=0.02)   # compute-bound


def test_gpu_profile_keeps_two_copy_engines():
    c = Costs.load(GPU, "llama7b_shape")
    assert c.link_kind == "device"
    engines = {op.engine for op in Offload().decode_graph(c, ModelShape(32, 8, 128, "float16"), 1, 4096)}
    assert engines == {"compute", "h2d", "d2h"}


def test_link_gbps_refused_on_a_gpu_profile_and_used_on_cpu(tmp_path):
    from hydra import compose, initialize_config_dir

    from core.errors import ConfigError
    from simulator.run import build_sim

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        gpu = compose("simulate", overrides=["hardware=h100-sxm", "model=llama7b_shape", "hardware.link.gbps=2",
                                             f"results_dir={tmp_path}"])
        cpu = compose("simulate", overrides=["policy=offload", "hardware.link.gbps=2", "hardware.link.latency_us=5",
                                             f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="hardware.link.gbps"):
        build_sim(gpu)
    sim, _ = build_sim(cpu)
    assert sim.costs.link == pytest.approx((2e9, 5e-6))


def test_whole_model_decode_layer_by_batch_and_context_by_hand():
    """decode_layer(batch, ctx) read from the whole-model table; extra query rows (SpeCache's
    guess) add only their cost at the smallest context; kivi adds its kernel difference."""
    c = costs()
    dl, full, kivi = c.table("decode_layer"), c.table("decode_attention_full"), c.table("decode_attention_kivi")
    assert len(dl.axes) == 2 and dl.names == ["batch", "context"]
    c0 = float(dl.axes[1][0])
    assert c.decode_layer(1, 3000, "decode_attention_full") == pytest.approx(dl(1, 3000), rel=1e-12)
    assert c.decode_layer(1, 3000, "decode_attention_full", rows=2) == pytest.approx(
        dl(1, 3000) + dl(2, c0) - dl(1, c0), rel=1e-12)
    assert c.decode_layer(2, 3000, "decode_attention_kivi") == pytest.approx(
        dl(2, 3000) + kivi(2, 3000) - full(2, 3000), rel=1e-12)
    # two query rows of one sequence cost less than two sequences (one sequence's K/V read once)
    assert c.decode_layer(1, 8000, "decode_attention_full", rows=2) < c.decode_layer(2, 8000, "decode_attention_full")
