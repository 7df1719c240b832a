"""Where a predicted step's time goes: the op phases of the twins' graphs, the critical-path
attribution of simulator/hardware.py (both fidelities), the layer parts, the result's `phases`
and the timeline (simulator.run)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from core.config import register
from core.errors import ConfigError
from core.profile.schema import BITS_KERNELS
from core.phases import PARTS, PHASES, STAGES, UNACCOUNTED, stage_record
from simulator.costs import KV_ELEMENT_BYTES, Costs, ModelShape
from simulator.hardware import detailed, solve
from simulator.policies import Full, Kivi, Offload, Op, Specache, make_policy
from simulator.scheduler import Sim

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
H100 = ROOT / "profiles/roofline-h100-sxm.json"
PROFILE = f"hardware.profile={CPU}"

register()


def costs(path=CPU, model="smollm2", link=None):
    c = Costs.load(path, model, allow_extrapolation=True, link=link)
    s = c.shape
    c.bind(s, s["n_layers"], KV_ELEMENT_BYTES[c.kv_dtype_auto])
    if not c.analytic:               # the committed CPU profile has 2-bit tables only: stand-ins for 1-bit
        kernels = c.profile["models"][model]["kernels"]
        for name in BITS_KERNELS:
            kernels.setdefault(f"{name}_1bit", kernels[name])
    return c, ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)


TWINS = [Full(), Offload(), Kivi(), Kivi(bits=1, group_size=32, residual=64), Specache(k=0, prefetch=False),
         Specache(k=64), Specache(k=64, prefetch=False), Specache(k=512, gather="device")]
RAGS = [dict(selector="epic", recompute_ratio=0.15), dict(selector="cacheblend", recompute_ratio=0.15),
        dict(selector="draft", draft_layers=3, recompute_ratio=0.3),
        dict(selector="draft_rel", draft_layers=3, store="disk"), dict(selector="reuse", store="disk")]
# (profile, model, link): copies on the compute thread (direct), an emulated link (one FIFO beside
# compute, the issue on the compute thread), a GPU's copy engines (roofline: no part tables)
SETUPS = [(CPU, "smollm2", None), (CPU, "smollm2", (1e9, 10e-6)), (H100, "llama7b_shape", None)]


def graphs(c, s):
    """(label, graph) of every twin's decode and prefill steps at a few points."""
    for p in TWINS:
        for B, ctx in ((1, 1000), (4, 3000)):
            yield f"{p.name}{vars(p)} decode B={B} ctx={ctx}", p.decode_graph(c, s, B, ctx)
        yield f"{p.name}{vars(p)} prefill", p.prefill_graph(c, s, [300, 1000])
    for kw in RAGS:
        p = make_policy({"name": "rag", **kw})
        yield f"rag {kw} prefill", p.prefill_graph(c, s, [2 * 512 + 32])


def ops_seconds(ops, engine="compute"):
    """{phase: summed seconds} of the ops on one engine, by hand."""
    out = {}
    for op in ops:
        if op.engine == engine:
            out[op.phase] = out.get(op.phase, 0.0) + op.seconds
    return out


# ----------------------------------------------------------------------------- hand-built graphs

@pytest.mark.parametrize("run", [solve, detailed], ids=["fast", "detailed"])
def test_a_copy_hidden_behind_compute_contributes_nothing(run):
    ops = [Op("layer0", "compute", 3.0), Op("fetch1", "h2d", 2.0), Op("layer1", "compute", 3.0, ("layer0", "fetch1"))]
    st = run(ops)
    assert st.seconds == 6.0
    assert st.phases == pytest.approx({"layer": 6.0, "fetch": 0.0})


@pytest.mark.parametrize("run", [solve, detailed], ids=["fast", "detailed"])
def test_a_copy_that_stalls_contributes_exactly_its_stall(run):
    # fetch1 runs [0, 5] beside layer0 [0, 3]: layer1 starts at 5, a stall of 2
    ops = [Op("layer0", "compute", 3.0), Op("fetch1", "h2d", 5.0), Op("layer1", "compute", 3.0, ("layer0", "fetch1"))]
    st = run(ops)
    assert st.seconds == 8.0
    assert st.phases == pytest.approx({"layer": 6.0, "fetch": 2.0})
    # a copy after compute that outlasts the step's last compute op: the tail is its own
    ops = [Op("layer0", "compute", 2.0), Op("back0", "d2h", 3.0, ("layer0",)), Op("lm_head", "compute", 1.0, ("layer0",))]
    st = run(ops)
    assert st.seconds == 5.0
    assert st.phases == pytest.approx({"layer": 2.0, "back": 2.0, "lm_head": 1.0})


@pytest.mark.parametrize("run", [solve, detailed], ids=["fast", "detailed"])
def test_offload_graph_where_the_fetch_outlasts_the_layer(run):
    # the offload twin's shape by hand: overhead 1, three layers of 2 s, each layer's fetch 5 s on
    # h2d (issued one layer ahead, waiting for the slot), lm_head 1. Timeline: overhead [0,1];
    # fetch1 [1,6], fetch2 [6,11], fetch0_next [11,16] back to back on h2d; layer0 [1,3],
    # layer1 [6,8] (waits for fetch1), layer2 [11,13] (fetch2), lm_head [13,14]; the step ends
    # with fetch0_next at 16. Compute is busy 1 + 6 + 1 = 8 s; the other 8 s it waits for the
    # fetch chain: [3,6] on fetch1, [8,11] on fetch2, [14,16] on fetch0_next.
    ops = [Op("overhead", "compute", 1.0)]
    prev = "overhead"
    for i in range(3):
        nxt = (i + 1) % 3
        ops.append(Op(f"fetch{nxt}" if nxt else "fetch0_next", "h2d", 5.0, (prev,)))
        ops.append(Op(f"layer{i}", "compute", 2.0, (prev,) if i == 0 else (prev, f"fetch{i}")))
        prev = f"layer{i}"
    ops.append(Op("lm_head", "compute", 1.0, (prev,)))
    st = run(ops, trace=True)
    assert st.seconds == 16.0
    assert st.phases == pytest.approx({"overhead": 1.0, "layer": 6.0, "fetch": 8.0, "lm_head": 1.0})
    when = {name: (a, b) for name, _, _, a, b in st.ops}
    assert when["layer1"] == pytest.approx((6.0, 8.0)) and when["fetch0_next"] == pytest.approx((11.0, 16.0))


@pytest.mark.parametrize("run", [solve, detailed], ids=["fast", "detailed"])
def test_stall_goes_to_the_copy_compute_waits_for_while_other_compute_runs(run):
    # x [0,2]; the copy c waits for x: [2,15]; k [2,12] runs beside it; y waits for k and c: [15,25].
    # Compute is idle [12,15] only: c's share is 3, not its 13 s
    ops = [Op("overhead", "compute", 2.0), Op("fetch0", "h2d", 13.0, ("overhead",)), Op("layer0", "compute", 10.0),
           Op("layer1", "compute", 10.0, ("layer0", "fetch0"))]
    st = run(ops)
    assert st.seconds == 25.0
    assert st.phases == pytest.approx({"overhead": 2.0, "fetch": 3.0, "layer": 20.0})


def test_layer_parts_follow_the_layer_ops_and_free_names_keep_theirs():
    parts = (("projections", 1.0), ("attention", 0.5), ("mlp", 1.5), ("other", 0.0))
    ops = [Op("layer0", "compute", 3.0, parts=parts), Op("fetch1", "h2d", 5.0),
           Op("layer1", "compute", 3.0, ("layer0", "fetch1"), parts=parts)]
    st = solve(ops)
    assert st.parts == pytest.approx({"projections": 2.0, "attention": 1.0, "mlp": 3.0, "other": 0.0})
    assert sum(st.parts.values()) == pytest.approx(st.phases["layer"])
    # one layer op without parts: the step has none rather than a partial split
    assert solve([*ops[:2], Op("layer1", "compute", 3.0, ("layer0", "fetch1"))]).parts == {}
    # a hand-built op with a free name has no phase and is attributed under its name
    st = solve([Op("k", "compute", 1.0), Op("c", "h2d", 3.0)])
    assert Op("k", "compute", 1.0).phase == "" and st.phases == pytest.approx({"k": 1.0, "c": 2.0})


def test_op_phases_default_to_their_names():
    assert Op("layer12", "compute", 1.0).phase == "layer"
    assert Op("fetch0_next", "h2d", 1.0).phase == "fetch"
    assert Op("load_features", "h2d", 1.0).phase == "load"
    assert Op("replace3", "compute", 1.0, phase="layer").phase == "layer"
    with pytest.raises(ValueError, match="not one of"):
        Op("x", "compute", 1.0, phase="attention")


# ----------------------------------------------------------------------------- the twins' graphs

@pytest.mark.parametrize("path,model,link", SETUPS, ids=["cpu-direct", "cpu-link", "h100"])
def test_every_twin_graph_is_fully_attributed_and_both_fidelities_agree(path, model, link):
    c, s = costs(path, model, link)
    for label, ops in graphs(c, s):
        assert all(op.phase in PHASES for op in ops), label
        fast, slow = solve(ops), detailed(ops)
        assert sum(fast.phases.values()) == pytest.approx(fast.seconds, rel=1e-12), label
        assert sum(slow.phases.values()) == pytest.approx(slow.seconds, rel=1e-9), label
        assert min(fast.phases.values()) >= -1e-12 * fast.seconds, label
        assert set(fast.phases) == set(slow.phases) == {op.phase for op in ops}, label
        for p, v in fast.phases.items():
            assert slow.phases[p] == pytest.approx(v, rel=1e-9, abs=1e-12 * fast.seconds), (label, p)
        # compute's own ops count in full: a phase only they have is their summed seconds
        # (copies add to a phase only what they stall)
        mine = ops_seconds(ops)
        for p in ("overhead", "lm_head", "score", "select", "rerotate"):
            if p in mine and not any(op.phase == p and op.engine != "compute" for op in ops):
                assert fast.phases[p] == pytest.approx(mine[p], rel=1e-12), (label, p)
        if c.analytic:
            assert fast.parts == {}, label              # formulas, no part tables
        else:
            # prefill has no attention table: its parts are projections, mlp and other
            assert set(fast.parts) == set(PARTS) - ({"attention"} if "prefill" in label else set()), label
            assert sum(fast.parts.values()) == pytest.approx(fast.phases["layer"], rel=1e-12), label
            assert min(fast.parts.values()) >= 0, label
            for p, v in fast.parts.items():
                assert slow.parts[p] == pytest.approx(v, rel=1e-9, abs=1e-12 * fast.seconds), (label, p)


def test_on_the_compute_thread_every_phase_is_its_ops_seconds():
    """Without a link (a CPU box) every copy is a memcpy on the compute thread: the step is its
    ops end to end and each phase is exactly its ops' seconds."""
    c, s = costs()
    for label, ops in graphs(c, s):
        st = solve(ops)
        assert {op.engine for op in ops} == {"compute"}, label
        assert st.phases == pytest.approx(ops_seconds(ops), rel=1e-12), label


def test_specache_and_kivi_put_score_and_quantize_in_their_own_phases():
    c, s = costs()
    L = s.n_layers
    for prefetch in (False, True):
        p = Specache(k=64, prefetch=prefetch)
        rows = p.query_rows(2)
        st = solve(p.decode_graph(c, s, 2, 2000))
        assert st.phases["score"] == pytest.approx(L * c.score_topk(rows, 2000, p.bits, p.group_size, batch=2))
        layer = c.decode_layer(2, 2000, p.attn_table, rows=rows, bits=p.bits, group_size=p.group_size)
        replace = c.replace(rows, p.k_eff(2000), s, p.bits)
        assert st.phases["layer"] == pytest.approx(L * (layer + replace), rel=1e-12)
        # the kivi copy's attention + the replace are the attention part
        assert st.parts["attention"] == pytest.approx(L * (c.table(p.attn_table)(2, 2000) + replace), rel=1e-12)
    for p in (Kivi(), Specache(k=64)):
        st = solve(p.prefill_graph(c, s, [500, 900]))
        quantize = c.quantize(500, p.bits, p.group_size) + c.quantize(900, p.bits, p.group_size)
        host = L * c.d2h(2 * 1400 * s.kv_row) if p.name == "specache" else 0.0
        assert st.phases["store"] == pytest.approx(L * quantize + host, rel=1e-12)
        # both prompts padded to 900, their GEMMs once over 1800 rows (simulator/policies/base.py batched_gemms)
        gemm = lambda t: c.table("projections")(t) + c.table("mlp")(t)  # noqa: E731
        assert st.phases["layer"] == pytest.approx(L * (2 * c.table("prefill_layer")(900) + gemm(1800) - 2 * gemm(900)),
                                                   rel=1e-12)
        # prefill parts: the projections and MLP over both (padded) prompts' rows, no attention table
        proj = c.table("projections")(1800)
        assert st.parts["projections"] == pytest.approx(L * proj, rel=1e-12) and "attention" not in st.parts


def test_parts_exceeding_the_op_are_scaled_down_to_it():
    from simulator.policies.base import split_parts
    parts = dict(split_parts(2.0, {"projections": 1.0, "attention": 2.0, "mlp": 1.0}))
    assert parts == pytest.approx({"projections": 0.5, "attention": 1.0, "mlp": 0.5, "other": 0.0})
    parts = dict(split_parts(5.0, {"projections": 1.0, "attention": 0.5, "mlp": 1.0}, attention=0.5))
    assert parts == pytest.approx({"projections": 1.0, "attention": 1.0, "mlp": 1.0, "other": 2.0})
    assert split_parts(5.0, None) == ()


def test_a_twin_op_without_a_phase_is_refused_naming_it():
    class Odd(Full):
        def decode_graph(self, c, s, batch, ctx):
            return [Op("warp", "compute", 1e-3)]

    c, s = costs()
    sim = Sim(c, s, Odd(), 10**9)
    with pytest.raises(ConfigError, match="op 'warp'.*no phase"):
        sim.run(_workload(batch=1, prompt_len=64, gen_len=3))


def _workload(**kw):
    from omegaconf import OmegaConf

    from core.config import WorkloadConfig
    return OmegaConf.structured(WorkloadConfig(**kw))


@pytest.mark.parametrize("fidelity", ["fast", "detailed"])
def test_sim_sums_every_iteration_per_stage(fidelity):
    c, s = costs(link=(2e9, 10e-6))
    sim = Sim(c, s, Specache(k=64), 10**10, fidelity=fidelity, max_batch=4)
    w = _workload(arrival="poisson", rate=50.0, n_requests=12, prompt_len=256, prompt_len_min=64, gen_len=6)
    reqs = sim.run(w)
    st = {k: v.record() for k, v in sim.stages.items()}
    assert st["prefill"]["steps"] + st["decode"]["steps"] == sim.iterations
    # every request's tokens after the first come from decode steps, each making <= max_batch of them
    assert st["decode"]["steps"] >= sum(r.gen_len - 1 for r in reqs) / 4
    for rec in st.values():
        assert abs(rec["phases"][UNACCOUNTED]["s"]) <= 1e-9 * rec["step_s"]
        named = sum(v["s"] for p, v in rec["phases"].items() if p != UNACCOUNTED)
        assert named == pytest.approx(rec["step_s"], rel=1e-9)
        assert sum(v["s"] for v in rec["parts"].values()) == pytest.approx(rec["phases"]["layer"]["s"], rel=1e-9)
    if fidelity == "fast":
        assert all(v.phases for v in sim._cache.values())     # cached with the step's time


# ----------------------------------------------------------------------------- simulator.run

def simulate_cfg(tmp_path, *overrides):
    from simulator.run import simulate
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("simulate", overrides=[PROFILE, f"results_dir={tmp_path}", "progress=false", *overrides])
    return cfg, simulate


def test_result_has_phases_for_both_stages_as_means_per_step(tmp_path):
    cfg, simulate = simulate_cfg(tmp_path, "model=smollm2", "policy=specache", "policy.k=64", "workload.batch=1",
                                 "workload.prompt_len=512", "workload.gen_len=6", "hardware.link.gbps=4")
    r = simulate(cfg)
    on_disk = json.loads(Path(r["path"]).read_text())
    assert on_disk["phases"] == r["phases"] and set(r["phases"]) == set(STAGES)
    pre, dec = r["phases"]["prefill"], r["phases"]["decode"]
    # one request: one prefill (its TTFT) and gen_len - 1 decode steps (TPOT is their mean)
    assert pre["steps"] == 1 and dec["steps"] == 5
    assert pre["step_s"] == pytest.approx(r["ttft_s"], rel=1e-9)
    assert dec["step_s"] == pytest.approx(r["tpot_s"], rel=1e-9)
    for st in (pre, dec):
        assert abs(st["phases"][UNACCOUNTED]["s"]) <= 1e-9 * st["step_s"]
        assert sum(v["share"] for p, v in st["phases"].items() if p != UNACCOUNTED) == pytest.approx(1.0)
    assert set(dec["parts"]) == set(PARTS) and set(pre["parts"]) == set(PARTS) - {"attention"}
    assert {"layer", "score", "fetch", "back", "lm_head", "overhead"} <= set(dec["phases"])
    assert {"layer", "store", "lm_head", "overhead"} <= set(pre["phases"])
    assert "timeline_path" not in r


def test_phases_false_writes_none(tmp_path):
    cfg, simulate = simulate_cfg(tmp_path, "model=tiny", "workload.batch=1", "workload.prompt_len=64",
                                 "workload.gen_len=3", "phases=false")
    r = simulate(cfg)
    assert "phases" not in r and "phases" not in json.loads(Path(r["path"]).read_text())


def test_timeline_is_a_chrome_trace_of_iterations_ops_and_requests(tmp_path):
    cfg, simulate = simulate_cfg(tmp_path, "model=tiny", "policy=offload", "workload=poisson", "workload.rate=100",
                                 "workload.n_requests=8", "workload.prompt_len=64", "workload.gen_len=4",
                                 "scheduler.max_batch=4", "hardware.link.gbps=1", "timeline=true")
    r = simulate(cfg)
    path = Path(r["timeline_path"])
    assert path.name == Path(r["path"]).stem + ".timeline.json" and path.parent == Path(r["path"]).parent
    assert json.loads(Path(r["path"]).read_text())["timeline_path"] == str(path)
    t = json.loads(path.read_text())
    assert t["displayTimeUnit"] == "ms" and "note" in t["metadata"]
    ev = t["traceEvents"]
    its = [e for e in ev if e.get("cat") == "iteration"]
    assert len(its) == r["sim_iterations"] and all(e["ph"] == "X" for e in its)
    names = {e["args"]["name"]: e["tid"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in its} == {names["compute"]}
    # iterations do not overlap and the last ends when the last request is done
    its.sort(key=lambda e: e["ts"])
    for a, b in zip(its, its[1:]):
        assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    done = max(e["ts"] for e in ev if e.get("cat") == "request" and e["ph"] == "e")
    assert its[-1]["ts"] + its[-1]["dur"] == pytest.approx(done, rel=1e-12)
    ops = [e for e in ev if e["ph"] == "X" and e.get("cat") in PHASES]
    assert {e["tid"] for e in ops} == {names["compute"], names["h2d"]}     # the emulated link: one FIFO
    # each iteration's ops lie inside it
    first = its[0]
    inside = [e for e in ops if first["ts"] - 1e-6 <= e["ts"] < first["ts"] + first["dur"]]
    assert inside and all(e["ts"] + e["dur"] <= first["ts"] + first["dur"] + 1e-6 for e in inside)
    # every request: one b/e pair (arrival to done) with the admitted and first-token instants
    reqs = [e for e in ev if e.get("cat") == "request"]
    ids = {e["id"] for e in reqs}
    assert len(ids) == r["requests"] == 8
    for i in ids:
        mine = sorted((e for e in reqs if e["id"] == i), key=lambda e: (e["ts"], "bne".index(e["ph"])))
        assert [e["ph"] for e in mine] == ["b", "n", "n", "e"]
        assert mine[0]["name"] == mine[-1]["name"]
        assert [e["name"] for e in mine[1:3]] == ["admitted", "first token"]


def test_timeline_caps_the_op_events(tmp_path, monkeypatch):
    import simulator.scheduler as sched
    monkeypatch.setattr(sched, "TIMELINE_OP_ITERATIONS", 2)
    cfg, simulate = simulate_cfg(tmp_path, "model=tiny", "workload.batch=1", "workload.prompt_len=64",
                                 "workload.gen_len=6", "timeline=true")
    r = simulate(cfg)
    t = json.loads(Path(r["timeline_path"]).read_text())
    its = [e for e in t["traceEvents"] if e.get("cat") == "iteration"]
    ops = [e for e in t["traceEvents"] if e["ph"] == "X" and e.get("cat") in PHASES]
    assert len(its) == 6 and t["metadata"]["op_iterations"] == 2
    c, s = costs(CPU, "tiny")
    assert len(ops) == len(Full().prefill_graph(c, s, [64])) + len(Full().decode_graph(c, s, 1, 65))


def test_timeline_into_an_unwritable_results_dir_fails_in_one_line_before_any_work(tmp_path, monkeypatch):
    import simulator.run as run
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg, simulate = simulate_cfg(blocker, "model=tiny", "timeline=true")
    monkeypatch.setattr(run, "build_sim", lambda *a, **k: pytest.fail("simulated before checking results_dir"))
    with pytest.raises(ConfigError) as e:
        simulate(cfg)
    assert "results_dir" in str(e.value) and "\n" not in str(e.value)


def test_closing_table_says_where_a_step_goes():
    from simulator.run import phase_line, phase_rows
    st = stage_record({"layer": 0.78 * 85.1e-3 * 4, "lm_head": 0.09 * 85.1e-3 * 4, "overhead": 0.02 * 85.1e-3 * 4,
                       "fetch": 0.11 * 85.1e-3 * 4, "back": 0.0}, 85.1e-3 * 4, 4,
                      {"attention": 0.2 * 85.1e-3 * 4, "mlp": 0.31 * 85.1e-3 * 4, "projections": 0.1 * 85.1e-3 * 4,
                       "other": 0.17 * 85.1e-3 * 4})
    assert phase_line("decode", st) == ("decode step 85.1 ms: layer 78% (mlp 31%, attention 20%, other 17%, "
                                        "projections 10%), fetch 11%, lm_head 9%, overhead 2%")
    rows = phase_rows({"phases": {"prefill": stage_record({}, 0.0, 0), "decode": st}})
    assert rows == [("where a step goes", phase_line("decode", st))]
    assert phase_rows({}) == []
    assert math.isnan(stage_record({}, 0.0, 0)["step_s"])


def test_a_taken_result_name_takes_its_timeline_along(tmp_path, monkeypatch):
    import simulator.run as run
    monkeypatch.setattr(run.time, "strftime", lambda *a: "20000101-000000")      # both runs: one name
    cfg, simulate = simulate_cfg(tmp_path, "model=tiny", "workload.batch=1", "workload.prompt_len=64",
                                 "workload.gen_len=2", "timeline=true")
    a, b = simulate(cfg), simulate(cfg)
    assert Path(b["path"]).name == Path(a["path"]).stem + "-2.json"
    for r in (a, b):
        assert r["timeline_path"] == str(run.timeline_file(Path(r["path"])))
        assert json.loads(Path(r["path"]).read_text())["timeline_path"] == r["timeline_path"]
        assert json.loads(Path(r["timeline_path"]).read_text())["traceEvents"]


def test_specache_fetch_over_an_emulated_link_is_the_runtimes():
    """Over an emulated link the runtime gathers the k rows and memcpys them on the compute thread
    (phase fetch), and only their transit waits for the link; without prefetch that transit is on
    the critical path, so the step's fetch phase is gather table + transit, by hand."""
    bw, lat = 1e9, 10e-6
    c, s = costs(link=(bw, lat))
    L, k, B = s.n_layers, 64, 1
    nbytes = 2 * B * k * s.kv_row
    t = c.table("gather")
    on_cpu = t(nbytes / float(t.extra.get("row_bytes", 256)))
    assert c.gather_split(nbytes) == pytest.approx((on_cpu, 2 * lat + nbytes / bw))
    p = Specache(k=k, prefetch=False)
    st = solve(p.decode_graph(c, s, B, 2000))
    assert st.phases["fetch"] == pytest.approx(L * (on_cpu + 2 * lat + nbytes / bw), rel=1e-9)
    # the new token's rows to the host store: their memcpy on the compute thread is `back`
    assert st.phases["back"] >= L * c.issue_cost(2 * B * s.kv_row) * (1 - 1e-9)
    # with prefetch the transit hides behind the next layers: only the compute-thread part stays
    st = solve(Specache(k=k, prefetch=True).decode_graph(c, s, B, 2000))
    assert st.phases["fetch"] == pytest.approx(L * on_cpu, rel=1e-6)
    # without a link (copies are memcpys on the compute thread) nothing is split off
    c0, _ = costs()
    assert c0.gather_split(nbytes) == (0.0, c0.gather(nbytes))


def test_specache_in_model_terms_shift_replace_fetch_and_back_by_hand():
    """A profile whose whole-model SpeCache step was measured (`gather_replace.in_model`): the
    replace part at the measured (rows, k) is the measured one, and the fetch / host write get
    what the lone transfer tables miss for the same bytes, on the compute thread."""
    c, s = costs(link=(4e9, 10e-6))
    L = s.n_layers
    base = solve(Specache(k=64, prefetch=False).decode_graph(c, s, 1, 1000)).phases
    c2, _ = costs(link=(4e9, 10e-6))
    im = {"rows": 2, "k": 64, "replace_s": 3e-4, "fetch_s": c2.gather(49152, over_link=False) + 1e-4,
          "fetch_bytes": 49152, "back_s": c2.table("d2h_pinned")(768) + 2e-5, "back_bytes": 768}
    c2.profile["models"]["smollm2"]["kernels"]["gather_replace"]["in_model"] = im
    assert c2.specache_extra() == pytest.approx((1e-4, 2e-5))
    assert c2.replace(2, 64, s) == pytest.approx(3e-4)
    st = solve(Specache(k=64, prefetch=False).decode_graph(c2, s, 1, 1000)).phases
    assert st["fetch"] - base["fetch"] == pytest.approx(L * 1e-4, rel=1e-6)
    assert st["back"] - base["back"] == pytest.approx(L * 2e-5, rel=1e-6)
