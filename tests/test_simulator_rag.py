"""The simulator's `policy=rag` twin (simulator/policies/rag.py): graph costs against the profile tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from core.config import register
from core.errors import ConfigError
from simulator.costs import Costs, ModelShape
from simulator.hardware import detailed, solve
from simulator.policies import make_policy
from simulator.policies import Rag

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
H100 = ROOT / "profiles/roofline-h100-sxm.json"
N, Q = 8 * 512, 32
P = N + Q

register()


@pytest.fixture(scope="module")
def cpu():
    c = Costs.load(CPU, "smollm2", allow_extrapolation=True)     # 8 x 512 chunks: m past the measured 1024
    s = c.shape
    return c, ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)


def ttft(c, sh, prompt=P, **knobs) -> float:
    return solve(make_policy({"name": "rag", **knobs}).prefill_graph(c, sh, [prompt])).seconds


def full_ttft(c, sh, prompt=P) -> float:
    return solve(make_policy({"name": "full"}).prefill_graph(c, sh, [prompt])).seconds


def test_selector_full_is_the_full_prefill(cpu):
    c, sh = cpu
    rag = make_policy({"name": "rag", "selector": "full"})
    full = make_policy({"name": "full"})
    assert rag.prefill_graph(c, sh, [P]) == full.prefill_graph(c, sh, [P])
    assert ttft(c, sh, selector="full") == full_ttft(c, sh)
    # decode and bytes are the full twin's
    assert rag.decode_graph(c, sh, 1, P) == full.decode_graph(c, sh, 1, P)
    assert rag.kv_bytes([P], sh) == full.kv_bytes([P], sh)


def test_reuse_cheaper_than_full(cpu):
    c, sh = cpu
    assert ttft(c, sh, selector="reuse") < full_ttft(c, sh) / 10


def test_ttft_grows_with_r_and_draft_layers(cpu):
    c, sh = cpu
    by_r = [ttft(c, sh, selector="draft", recompute_ratio=r) for r in (0.0, 0.05, 0.15, 0.3, 0.6)]
    assert by_r == sorted(by_r) and by_r[0] < by_r[-1]
    by_d = [ttft(c, sh, selector="draft", draft_layers=d) for d in (1, 3, 5, 10, 20)]
    assert by_d == sorted(by_d) and by_d[0] < by_d[-1]
    for sel in ("random", "epic", "cacheblend"):
        assert ttft(c, sh, selector=sel, recompute_ratio=0.1) < ttft(c, sh, selector=sel, recompute_ratio=0.5)


@pytest.mark.parametrize("D", [3, 5, 10])
def test_draft_speedup_near_bound(cpu, D):
    c, sh = cpu
    r, L = 0.15, sh.n_layers
    speedup = full_ttft(c, sh) / ttft(c, sh, selector="draft", recompute_ratio=r, draft_layers=D)
    bound = 1 / (r + D / L)
    # up to 1.1x: read by the quadratic rule (core/profile/interp.py), the lone-layer selective_prefill
    # at m = 647 costs 0.13 of the whole-model-scaled prefill_layer (x1.07 past 2K), not r_eff = 0.157
    assert 0.5 * bound < speedup <= 1.1 * bound


def hand_sum(c, sh, sel, r=0.15, D=5, store="warm") -> float:
    L = sh.n_layers
    m = (0 if sel == "reuse" else math.ceil(r * N - 1e-9)) + Q
    rerot, recompute = c.table("rope_rerotate")(N), c.table("selective_prefill")(m, P)
    # one layer's loads (8 chunk files); a warm store's K/V are in device memory already
    load = 8 * c.table("chunk_load")(512) if store == "disk" else 0.0
    select = {"draft": D * c.table("prefill_layer")(P),
              "cacheblend": c.table("prefill_layer")(P) + c.table("projections")(P)}.get(sel, 0.0)
    # the compute stream: overhead [draft], then re-rotation of layer 0 once its loads are in;
    # each later layer's loads end before its re-rotation (a re-rotation outlasts a layer's loads)
    assert rerot >= load
    t = c.table("step_overhead")(1) + (select if sel == "draft" else 0.0)
    if c.link_kind == "direct":      # a CPU box: a load is a memcpy on the compute thread, in series
        t += L * load + L * rerot
    else:
        t = max(t, load) + L * rerot
    t += (select if sel == "cacheblend" else 0.0) + L * recompute + c.table("lm_head_sample")(1)
    return t


@pytest.mark.parametrize("store", ["warm", "disk"])
@pytest.mark.parametrize("sel", ["draft", "reuse", "random", "epic", "cacheblend"])
def test_single_request_ttft_equals_hand_sum(cpu, sel, store):
    c, sh = cpu
    expect = hand_sum(c, sh, sel, store=store)
    assert ttft(c, sh, selector=sel, store=store) == pytest.approx(expect, rel=1e-9)
    pol = make_policy({"name": "rag", "selector": sel, "store": store})
    assert detailed(pol.prefill_graph(c, sh, [P])).seconds == pytest.approx(expect, rel=1e-9)   # SimPy fidelity


def test_load_bound_when_loads_dominate():
    """H100 roofline, llama7b shape: chunk loads (PCIe + disk) exceed the recompute per layer,
    so the h2d engine sets the TTFT, not the compute sum."""
    c = Costs.load(H100, "llama7b_shape")
    s = c.shape
    sh = ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)
    pol = make_policy({"name": "rag", "selector": "reuse", "store": "disk"})
    st = solve(pol.prefill_graph(c, sh, [P]))
    assert solve(make_policy({"name": "rag", "selector": "reuse"}).prefill_graph(c, sh, [P])).busy["h2d"] == 0   # warm
    loads = sh.n_layers * 8 * c.table("chunk_load")(512)
    assert st.seconds >= loads
    assert st.busy["h2d"] == pytest.approx(loads)


def test_missing_table_one_line_error(tmp_path, cpu):
    prof = json.loads(CPU.read_text())
    del prof["models"]["smollm2"]["kernels"]["selective_prefill"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    c = Costs.load(path, "smollm2", allow_extrapolation=True)
    pol = make_policy({"name": "rag", "selector": "draft", "store": "disk"})
    with pytest.raises(ConfigError) as e:
        c.need(*pol.tables())
    msg = str(e.value)
    assert "\n" not in msg and "selective_prefill" in msg and str(path) in msg
    # selector=full needs no RAG table
    c.need(*make_policy({"name": "rag", "selector": "full"}).tables())


@pytest.mark.parametrize("knob, msg", [({"recompute_ratio": 1.5}, "recompute_ratio"),
                                       ({"selector": "nope"}, "selector"),
                                       ({"chunk_len": 0}, "chunk_len"),
                                       ({"draft_layers": 0}, "draft_layers")])
def test_bad_knobs(knob, msg):
    with pytest.raises(ConfigError, match=msg):
        make_policy({"name": "rag", **knob})


def test_draft_layers_beyond_model(cpu):
    c, sh = cpu
    with pytest.raises(ConfigError, match=r"draft_layers=31 must be in \[1, 30\]"):
        ttft(c, sh, selector="draft", draft_layers=31)


def test_cli_accepts_policy_rag(tmp_path):
    from simulator.run import simulate
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("simulate", overrides=["policy=rag", "workload=rag", "workload.gen_len=2",
                                             "policy.draft_layers=3", f"results_dir={tmp_path}"])
        pol = make_policy(cfg.policy)
        assert isinstance(pol, Rag) and pol.draft_layers == 3 and pol.selector == "draft"
        r = simulate(cfg)
    assert r["policy"] == "rag" and r["requests"] == 1
    c = Costs.load(CPU, "smollm2", allow_extrapolation=True)     # 8 x 512 chunks: m past the measured 1024
    s = c.shape
    sh = ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)
    assert r["ttft_s"] == pytest.approx(ttft(c, sh, selector="draft", draft_layers=3), rel=1e-9)


SAME = ["model=tiny", "policy=rag", "workload=rag", "policy.chunk_len=32", "policy.question_len=8",
        "workload.prompt_len=136", "workload.gen_len=2", "policy.draft_layers=1", "progress=false"]


def test_bench_and_simulator_take_the_identical_config(tmp_path):
    """One composed config, both halves: the shared groups are equal and both runs succeed, so
    a validation joins measured and simulated records on config and compares TTFT."""
    from runtime import bench
    from simulator.run import simulate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        b = compose("bench", overrides=[*SAME, f"results_dir={tmp_path}"])
        s = compose("simulate", overrides=[*[o for o in SAME if not o.startswith("progress")],
                                           f"results_dir={tmp_path}"])
    for group in ("model", "policy", "workload"):
        assert b[group] == s[group], group
    measured, simulated = bench.run(b), simulate(s)
    for rec in (measured, simulated):
        assert rec["policy"] == "rag" and rec["ttft_s"] > 0
        for group in ("model", "policy", "workload"):
            assert rec["config"][group] == measured["config"][group]


@pytest.mark.parametrize("P, chunk, q", [(4128, 512, 32), (2000, 512, 32), (20, 512, 32), (136, 32, 8)])
def test_prompt_cut_like_the_runtime(P, chunk, q):
    from runtime.rag import split_prompt

    pol = make_policy({"name": "rag", "chunk_len": chunk, "question_len": q})
    chunks, question = split_prompt(list(range(P)), chunk, q)
    n, qq = pol.split(P)
    assert (n, qq) == (sum(map(len, chunks)), len(question))
    assert pol.chunks(n) == [len(c) for c in chunks]


def test_epic_fixed_prefix_recomputes_the_prefixes(cpu):
    c, sh = cpu
    pol = make_policy({"name": "rag", "selector": "epic", "epic_prefix": 16, "recompute_ratio": 0.9})
    assert pol.recomputed(N, Q) == 8 * 16 + Q
    assert make_policy({"name": "rag", "selector": "epic", "epic_prefix": 600}).recomputed(N, Q) == N + Q
    # r is ignored: the TTFT is that of the prefixes, below epic at r = 0.15 (77 per chunk)
    assert ttft(c, sh, selector="epic", epic_prefix=16, recompute_ratio=0.9) < ttft(c, sh, selector="epic")
    with pytest.raises(ConfigError, match="policy.epic_prefix"):
        make_policy({"name": "rag", "selector": "epic", "epic_prefix": 0})


def test_separate_draft_must_name_a_shape_preset():
    """The simulator costs a separate draft by its preset shape; a file path is refused in one line."""
    from analysis.validate import compose_config
    from simulator.run import build_sim
    cfg = compose_config("simulate", ["model=llama3_8b_shape", "hardware=a100", "policy=rag", "workload=rag",
                                      "policy.draft_model=/some/draft.gguf"])
    with pytest.raises(ConfigError, match="policy.draft_model=/some/draft.gguf.*llama32_1b_shape") as e:
        build_sim(cfg)
    assert "\n" not in str(e.value)
    make_policy({"name": "rag", "selector": "epic", "draft_model": "/some/draft.gguf"})   # only draft uses it
