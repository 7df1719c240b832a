"""runtime/phases.py in the runtime: where a step's time goes (core/phases.py's names), measured
against the steps' own wall time, per policy, in the result JSONs of runtime.bench and
runtime.serve, and the Chrome timeline beside them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from core.errors import ConfigError
from core.phases import PARTS, PHASES, UNACCOUNTED
from core.results import phase_rows, summarize, timeline_path
from runtime import bench, phases, serve
from runtime.engine import SamplingParams, generate
from runtime.kv import policy_spec
from runtime.transfer import EmulatedLink

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
TOL = 0.03                      # |unaccounted| <= 3% of the step
SPECACHE = dict(bits=2, group_size=16, residual=16, k=8)


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=["model=tiny", "progress=false", *overrides])


def _prompts(n=2, length=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (length - 7 * i,), generator=g).tolist() for i in range(n)]


def _timed_sum(stage: dict) -> float:
    return sum(stage["phases"].values())


def _events(trace, cat=None, ph=None):
    return [e for e in trace["traceEvents"] if (cat is None or e.get("cat") == cat) and (ph is None or e["ph"] == ph)]


# ----------------------------------------------------------------------------- the engine

def test_phases_tile_each_step_of_generate(tiny_model):
    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    r = generate(tiny_model, _prompts(), p, policy_spec("full"), timeline=True)
    dec, pre = r.phases["decode"], r.phases["prefill"]
    # the phase windows are the engine's: decode = exactly the `steps`, prefill = t0 .. first token
    assert dec["steps"] == len(r.steps) == 9 and pre["steps"] == 1
    assert dec["step_s"] == pytest.approx(sum(r.steps), rel=1e-12)
    assert pre["step_s"] == pytest.approx(r.prefill_s, rel=1e-12)
    for st in (pre, dec):
        assert abs(st["step_s"] - _timed_sum(st)) <= TOL * st["step_s"]
        assert st["phases"]["layer"] == pytest.approx(sum(st["parts"].values()), rel=1e-12)
        assert set(st["parts"]) == set(PARTS) and {"overhead", "layer", "lm_head"} <= set(st["phases"])
        assert set(st["phases"]) <= set(PHASES)
    # every step on its own: its laps (timeline) cover its wall time within 3%
    decode_steps = [s for s in r.timeline if s["stage"] == "decode"]
    assert [s["t1"] - s["t0"] for s in decode_steps] == pytest.approx(r.steps, rel=1e-12)
    for s in r.timeline:
        wall, laps = s["t1"] - s["t0"], s["times"].laps
        assert abs(wall - sum(b - a for _, a, b in laps)) <= TOL * wall
        assert all(b >= a for _, a, b in laps)
        assert len(s["times"].groups) == tiny_model.args.n_layers          # one span per layer


def test_phases_off_times_nothing(tiny_model):
    r = generate(tiny_model, _prompts(1), SamplingParams(max_new_tokens=4, ignore_eos=True), policy_spec("full"),
                 phases=False)
    assert r.phases == {} and r.timeline == [] and len(r.steps) == 3
    assert summarize([r])["phases"] == {}


def test_lap_outside_a_step_is_a_no_op_and_suspended_hides_laps():
    phases.lap("attention")                                  # no step open: nothing happens
    assert not phases.active()
    t = phases.PhaseTimer("cpu")
    with t.step() as outer:
        phases.lap("mlp")
        with phases.suspended():
            assert not phases.active()
            phases.lap("attention")                          # goes nowhere: stays in the next lap
        phases.lap("select")
    got = outer.times
    assert "attention" not in got.parts and set(got.parts) == {"mlp"} and "select" in got.phases
    assert not phases.active()
    with pytest.raises(ValueError, match="neither phases"):
        with t.step():
            phases.lap("lunch")


def test_offload_fetch_back_store_and_link_waits_land_in_fetch(tiny_model):
    link = EmulatedLink(0.05, latency_us=50)                # slow: every layer's fetch waits
    r = generate(tiny_model, _prompts(), SamplingParams(max_new_tokens=6, ignore_eos=True), policy_spec("offload"),
                 link=link)
    pre, dec = r.phases["prefill"], r.phases["decode"]
    assert pre["phases"]["store"] > 0
    assert dec["phases"]["fetch"] > 0 and dec["phases"]["back"] > 0
    # the link's blocked time (all of it in decode steps' acquire) is inside `fetch`
    assert link.stats.wait_s > 0 and dec["phases"]["fetch"] >= link.stats.wait_s
    assert abs(dec["step_s"] - _timed_sum(dec)) <= TOL * dec["step_s"]


@pytest.mark.parametrize("prefetch", [True, False])
def test_specache_score_fetch_back_store(tiny_model, prefetch):
    pol = policy_spec("specache", prefetch=prefetch, **SPECACHE)
    r = generate(tiny_model, _prompts(), SamplingParams(max_new_tokens=8, ignore_eos=True), pol,
                 link=EmulatedLink(4, latency_us=10), timeline=True)
    pre, dec = r.phases["prefill"], r.phases["decode"]
    assert pre["phases"]["store"] > 0
    for p in ("score", "fetch", "back"):
        assert dec["phases"][p] > 0, p
    assert abs(dec["step_s"] - _timed_sum(dec)) <= TOL * dec["step_s"]
    # the emulated link's copies are on the timeline: rows up (fetch) and the new token down (back)
    tracks = {c[0] for s in r.timeline for c in s["times"].copies}
    assert tracks == {"h2d", "d2h"}


def test_kivi_prefill_store(tiny_model):
    pol = policy_spec("kivi", bits=2, group_size=16, residual=16)
    r = generate(tiny_model, _prompts(), SamplingParams(max_new_tokens=3, ignore_eos=True), pol)
    assert r.phases["prefill"]["phases"]["store"] > 0 and "store" not in r.phases["decode"]["phases"]


# ----------------------------------------------------------------------------- runtime.bench

def test_bench_record_phases_and_table(tmp_path):
    cfg = _cfg("bench", "experiment=smoke", f"results_dir={tmp_path}", "repeats=2", "workload.prompt_len=64")
    r = bench.run(cfg)
    data = json.loads(Path(r["path"]).read_text())
    ph = data["phases"]
    assert list(ph) == ["prefill", "decode"]
    assert ph["prefill"]["steps"] == 2 and ph["decode"]["steps"] == 2 * (cfg.workload.gen_len - 1)
    for st in ph.values():
        assert abs(st["phases"][UNACCOUNTED]["share"]) <= TOL
        assert st["phases"]["layer"]["s"] == pytest.approx(sum(v["s"] for v in st["parts"].values()), rel=1e-9)
        total = sum(v["s"] for v in st["phases"].values())
        assert total == pytest.approx(st["step_s"], rel=1e-9)          # unaccounted closes the sum
    # a decode step is shorter than a token's whole turn in the loop (TPOT: the steps plus the glue between)
    assert 0 < ph["decode"]["step_s"] <= data["tpot_s"] * (1 + TOL)
    rows = dict(phase_rows(data))
    layer_pct = round(100 * ph["decode"]["phases"]["layer"]["share"])
    assert f"layer {layer_pct}%" in rows["decode step"] and "unaccounted" in rows["decode step"]
    assert "decode step" in bench.format_table(r) and "timeline_path" not in data


def test_bench_phases_false_writes_none(tmp_path):
    r = bench.run(_cfg("bench", "experiment=smoke", f"results_dir={tmp_path}", "phases=false"))
    data = json.loads(Path(r["path"]).read_text())
    assert data["phases"] == {} and phase_rows(data) == []
    assert "decode step" not in bench.format_table(r)


def test_bench_timeline_has_every_step(tmp_path):
    cfg = _cfg("bench", "experiment=smoke", f"results_dir={tmp_path}", "repeats=2", "timeline=true",
               "policy=offload", "hardware.link.gbps=1", "hardware.link.latency_us=10")
    r = bench.run(cfg)
    data = json.loads(Path(r["path"]).read_text())
    tl = Path(data["timeline_path"])
    assert tl == timeline_path(r["path"]) and tl.parent == Path(r["path"]).parent and tl.is_file()
    assert sorted(p.name for p in tl.parent.iterdir()) == sorted([Path(r["path"]).name, tl.name])   # no temp files
    trace = json.loads(tl.read_text())
    assert trace["displayTimeUnit"] == "ms"
    steps = _events(trace, "step", "X")
    decode = [e for e in steps if e["args"]["stage"] == "decode"]
    assert len(decode) == data["phases"]["decode"]["steps"] == 2 * (cfg.workload.gen_len - 1)
    assert len(steps) - len(decode) == data["phases"]["prefill"]["steps"] == 2
    inner = [e for e in trace["traceEvents"] if e["ph"] == "X" and e.get("cat") in ("phase", "part")]
    for s in decode:                                      # its laps nest inside it and fill it
        kids = [e for e in inner if s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1e-3]
        assert abs(sum(e["dur"] for e in kids) - s["dur"]) <= TOL * s["dur"]
        assert {"fetch", "back", "attention"} <= {e["name"] for e in kids}
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert {"compute", "h2d", "d2h"} <= tracks
    assert _events(trace, "copy", "X")


def test_bench_rag_prefill_phases(tmp_path):
    cfg = _cfg("bench", "policy=rag", "workload=rag", "policy.chunk_len=32", "policy.question_len=8",
               "workload.prompt_len=136", "workload.gen_len=4", "policy.draft_layers=1", "policy.selector=draft",
               "repeats=1", f"results_dir={tmp_path}")
    r = bench.run(cfg)
    pre = r["phases"]["prefill"]
    assert pre["steps"] == 1
    for p in ("load", "rerotate", "select", "layer", "lm_head"):
        assert pre["phases"][p]["s"] > 0, p
    assert abs(pre["phases"][UNACCOUNTED]["share"]) <= TOL
    assert pre["step_s"] == pytest.approx(r["prefill_s"], rel=1e-9)        # the rag pipeline + first token
    # the selector's own model pass is `select`, never counted as the prompt's layers
    assert pre["phases"]["select"]["s"] >= 0.5 * r["policy_stats"]["select_s"]


# ----------------------------------------------------------------------------- runtime.serve

def test_serve_phases_and_timeline(tmp_path):
    cfg = _cfg("serve", "workload=poisson", "workload.rate=200", "workload.n_requests=5", "workload.prompt_len=40",
               "workload.gen_len=6", "timeline=true", "warmup=false", f"results_dir={tmp_path}")
    r = serve.run(cfg)
    ph = r["phases"]
    assert ph["prefill"]["steps"] == r["prefill_iterations"]
    assert ph["decode"]["steps"] == r["iterations"] - r["prefill_iterations"]
    assert ph["prefill"]["step_s"] * ph["prefill"]["steps"] == pytest.approx(r["prefill_s"], rel=1e-9)
    for st in ph.values():
        assert abs(st["phases"][UNACCOUNTED]["share"]) <= TOL
    trace = json.loads(Path(r["timeline_path"]).read_text())
    assert len(_events(trace, "step", "X")) == r["iterations"]
    by_id: dict[int, list] = {}
    for e in _events(trace, "request"):
        by_id.setdefault(e["id"], []).append(e)
    assert sorted(by_id) == [q["id"] for q in r["per_request"]]
    for q in r["per_request"]:
        ev = by_id[q["id"]]
        b, = [e for e in ev if e["ph"] == "b"]
        e, = [e for e in ev if e["ph"] == "e"]
        assert b["ts"] == pytest.approx(q["arrival_s"] * 1e6, abs=1) and e["ts"] == pytest.approx(q["done_s"] * 1e6, abs=1)
        assert b["ts"] <= e["ts"]
        assert {x["name"] for x in ev if x["ph"] == "n"} == {"admitted", "first token"}
    assert "decode step" in serve.format_table(r)


def test_serve_phases_false(tmp_path):
    r = serve.run(_cfg("serve", "workload.batch=2", "workload.prompt_len=30", "workload.gen_len=3", "phases=false",
                       "warmup=false", f"results_dir={tmp_path}"))
    assert r["phases"] == {} and "timeline_path" not in r


# ----------------------------------------------------------------------------- nothing lost

def test_timeline_unwritable_results_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "measured").write_text("a file in the way")
    ran = []
    monkeypatch.setattr(bench.loaders, "from_config", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(serve.loaders, "from_config", lambda *a, **k: ran.append(1))
    with pytest.raises(ConfigError, match="results_dir"):
        bench.run(_cfg("bench", "experiment=smoke", "timeline=true", f"results_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="results_dir"):
        serve.run(_cfg("serve", "timeline=true", f"results_dir={tmp_path}"))
    assert ran == []


def test_cli_timeline_unwritable_one_line(tmp_path):
    (tmp_path / "measured").write_text("")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "runtime.bench", "experiment=smoke", "timeline=true",
                        f"results_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "results_dir" in p.stderr and not list(tmp_path.glob("**/*.timeline.json"))


def test_cuda_event_path_resolves_laps_on_the_host_clock(monkeypatch):
    """The CUDA path's bookkeeping (events recorded per lap, resolved once at the step's end,
    pooled) with stand-in events whose clock is perf_counter: no GPU here."""
    import time

    class FakeEvent:
        made = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            FakeEvent.made += 1
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    t = phases.PhaseTimer("cuda", spans=True)
    for _ in range(3):
        t0 = time.perf_counter()
        with t.step() as h:
            since = phases.mark()
            time.sleep(0.002)
            phases.lap("mlp")
            time.sleep(0.001)
            phases.lap("fetch")
            phases.group("block0", since)
        wall = time.perf_counter() - t0
        got = h.times
        assert got.parts["mlp"] >= 0.002 and got.phases["fetch"] >= 0.001
        assert got.phases["layer"] == got.parts["mlp"]
        assert abs(got.timed_s - wall) <= TOL * wall
        assert [n for n, _, _ in got.laps] == ["mlp", "fetch", "overhead"] and got.groups[0][0] == "block0"
    assert FakeEvent.made == 4                 # a step's 4 events, reused by the next steps
