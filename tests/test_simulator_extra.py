"""benchmarks/fetch_hiding.py: the fetch-hiding curves of the specache twin (fast, < 10 s)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from simulator.costs import Costs
from simulator.hardware import solve
from simulator.policies import Kivi

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_hiding", ROOT / "benchmarks/fetch_hiding.py")
fh = importlib.util.module_from_spec(spec)
sys.modules["fetch_hiding"] = fh            # dataclasses look their module up
spec.loader.exec_module(fh)

CASES = [("profiles/roofline-h100-sxm.json", "llama7b_shape", 4096),
         ("profiles/roofline-a6000.json", "llama7b_shape", 4096),
         ("profiles/cpu-intel-r-xeon-r-processor-2c.json", "smollm2", 2048)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: Path(c[0]).stem)
def curves(request):
    path, model, ctx = request.param
    c = Costs.load(ROOT / path, model, allow_extrapolation=True)    # CPU at batch 16: past its batch-4 grid
    s = fh.shape_of(c)
    return c, s, ctx, {b: fh.step_times(c, s, b, ctx) for b in (1, 16)}, "roofline" in path


def test_k0_prefetch_on_off_and_fetch_removed_equal_kivi(curves):
    c, s, ctx, by_batch, _ = curves
    for b, (base, pts) in by_batch.items():
        p0 = pts[0]
        assert p0.k == 0 and p0.fetch == 0
        assert base == pytest.approx(solve(Kivi().decode_graph(c, s, b, ctx)).seconds, rel=1e-12)
        assert p0.prefetch == p0.no_prefetch == p0.no_fetch == pytest.approx(base, rel=1e-12)


def test_steps_ordered_and_monotone_in_k(curves):
    _, _, _, by_batch, _ = curves
    for _, pts in by_batch.values():
        for p in pts:
            # removing the fetch never makes the prefetch step slower
            assert p.no_fetch <= p.prefetch * (1 + 1e-9)
        for a, b in zip(pts[1:], pts[2:]):
            assert b.prefetch >= a.prefetch * (1 - 1e-9)
            assert b.no_prefetch >= a.no_prefetch * (1 - 1e-9)
            assert b.no_fetch >= a.no_fetch * (1 - 1e-9)
            assert b.fetch >= a.fetch * (1 - 1e-9)


def test_hidden_region_is_a_prefix_and_shrinks_with_batch(curves):
    _, _, _, by_batch, roofline = curves
    tol = 0.05
    limits = {}
    for b, (_, pts) in by_batch.items():
        k_hid = fh.hidden_up_to(pts, tol)
        exposed = fh.first_k(pts, lambda p: p.no_fetch, tol)
        limits[b] = k_hid
        ks = [p.k for p in pts if p.k]
        # the exposed region starts right after the hidden one (hidden is a prefix of the k grid)
        if exposed is not None:
            assert k_hid is None or ks.index(exposed) == ks.index(k_hid) + 1
        if k_hid is not None:
            assert all(p.prefetch <= (1 + tol) * p.no_fetch for p in pts if 0 < p.k <= k_hid)
    # roofline (memory-bound, linear) steps: a larger batch fetches more rows per layer than its
    # compute grows, so it never hides a larger k (the measured CPU's batch-16 compute grows
    # faster than linearly and hides every k: no such claim there)
    if roofline:
        assert limits[1] is not None and limits[16] is not None and limits[16] <= limits[1]


def test_rho_is_the_design_ratio():
    assert fh.rho(2, 64, 2) == pytest.approx((2 + 32 / 64) / 16)
    assert fh.rho(1, 32, 2) == pytest.approx((1 + 1) / 16)
    assert fh.rho(2, 64, 4) == pytest.approx((2 + 1) / 32)     # float32 K/V: scale, zero in float32


def test_a_costs_is_complete_when_built_and_a_draft_shares_the_record():
    """build_sim gives Costs.load the run's link and compute_scale; a RAG draft records into the
    target's `extrapolated` set itself (one run, one record), and the target's Costs carry the
    draft's weights (its KV room shrinks by them)."""
    from analysis.validate import compose_config
    from simulator.run import build_sim

    over = ["hardware=a100", "model=llama3_8b_shape", "policy=rag", "workload=rag", "workload.prompt_len=3104",
            "policy.selector=draft", "policy.draft_layers=16", "policy.draft_model=llama32_1b_shape"]
    sim, _ = build_sim(compose_config("simulate", over), compute_scale=1.5)
    d = sim.policy.draft_costs
    assert d.extrapolated is sim.costs.extrapolated
    assert sim.costs.compute_scale == 1.5 and sim.costs.link is None
    assert sim.costs.extra_weights_bytes == d.weights_bytes > 0
    d.extrapolated.add("probe")                     # what the draft records, the run's result reports
    assert "probe" in sim.costs.extrapolated
    cpu, _ = build_sim(compose_config("simulate", ["policy=offload", "hardware.link.gbps=2"]))
    assert cpu.costs.link == pytest.approx((2e9, 0.0)) and cpu.costs.link_kind == "emulated"
    # a Costs loaded alone records into a set of its own
    a = Costs.load(ROOT / CASES[2][0], "smollm2")
    b = Costs.load(ROOT / CASES[2][0], "smollm2", extrapolated=a.extrapolated)
    assert b.extrapolated is a.extrapolated and Costs.load(ROOT / CASES[2][0], "smollm2").extrapolated is not a.extrapolated
