"""Machine identity, the cache root, profile lookup and first use, noise-aware validation, bits tables."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core import machine as M
from core.errors import ConfigError
from core.profile import lookup
from runtime.profile import first_use, speed
from core.profile.schema import SCHEMA_VERSION, ProfileError, validate

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "profiles" / "cpu-intel-r-xeon-r-processor-2c.json"
ROOFLINE = REPO / "profiles" / "roofline-h100-sxm.json"
CPU = torch.device("cpu")


def this_machine_profile(index: float = 100.0) -> dict:
    """The committed profile's tables, relabelled as a profile of this machine of this schema,
    every kernel table timed on the code path the runtime takes now."""
    from core.profile.schema import current_code_path
    from core.machine import device_facts

    prof = json.loads(COMMITTED.read_text())
    prof["schema_version"] = SCHEMA_VERSION
    prof["device"] = device_facts(CPU)
    prof["speed_index"] = {"index": index, "gemm_s": 0.01, "memcpy_s": 0.01, "attention_s": 0.01}
    for m in prof["models"].values():
        for name, t in m["kernels"].items():
            if isinstance(t, dict) and "axes" in t:
                t["code_path"] = current_code_path("cpu", name)
    return prof


def steady_speed(monkeypatch, index: float) -> None:
    """`ensure`'s speed probe (the bracket's before) reads `index`, as the fake profiles do."""
    monkeypatch.setattr(first_use, "speed_now", lambda device, shape: index)


# ----------------------------------------------------------------------------- identity and cache

def test_fingerprint_differs_with_caches_and_not_with_unrelated_facts():
    facts = {"type": "cpu", "cpu_model": "Intel(R) Xeon(R) Processor", "physical_cores": 2, "logical_cores": 2,
             "torch_threads": 2, "l2_bytes": 2 << 20, "l3_bytes": 300 << 20, "isa": ["avx2", "avx512f"],
             "memory_bytes": 24 << 30, "torch": "2.13.0+cpu", "torch_build": "abc"}
    fp = M.fingerprint(facts)
    assert len(fp) == 12 and fp == M.fingerprint(dict(facts))
    assert M.fingerprint({**facts, "l3_bytes": 480 << 20}) != fp
    assert M.fingerprint({**facts, "l2_bytes": 1 << 20}) != fp
    assert M.fingerprint({**facts, "isa": ["avx2"]}) != fp
    assert M.fingerprint({**facts, "note": "not a speed fact"}) == fp
    here = M.machine_facts(CPU)
    assert here["logical_cores"] >= 1 and here["torch"] == torch.__version__
    assert M.this_fingerprint(CPU) == M.fingerprint(here)


def test_cache_sizes_read_from_sysfs_layout(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (2, "Unified", "2048K"), (3, "Unified", "300 MiB")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert M.cache_sizes(tmp_path) == {"l2_bytes": 2048 << 10, "l3_bytes": 300 << 20}


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVTESTBED_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert M.cache_root() == tmp_path / "home" / ".cache" / "kvtestbed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_root() == tmp_path / "xdg" / "kvtestbed"
    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "mine"))
    assert M.cache_root() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    from runtime.rag import default_cache_dir

    assert default_cache_dir() == tmp_path / "mine" / "chunks"


def test_unwritable_cache_is_one_line_naming_it_and_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KVTESTBED_CACHE", str(blocker / "cache"))
    with pytest.raises(ConfigError) as e:
        M.cache_root()
    msg = str(e.value)
    assert "\n" not in msg and str(blocker / "cache") in msg and "KVTESTBED_CACHE" in msg


def test_unwritable_cache_exits_2_from_validate(tmp_path, monkeypatch, capsys):
    from analysis import validate as V

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KVTESTBED_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(lookup, "REPO_PROFILES", tmp_path / "none")
    monkeypatch.setattr(speed, "speed_index", lambda *a, **k: {"index": 1.0})
    with pytest.raises(SystemExit) as e:
        V.main(["experiment=validate_quick", f"results_dir={tmp_path}", "only=[full_b1_p512]", "progress=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("analysis.validate: error:") and "KVTESTBED_CACHE" in err[-1]


def test_speed_index_probes_and_index():
    si = speed.speed_index(CPU, {"dim": 64, "n_heads": 4, "n_kv_heads": 2}, reps=2)
    secs = [si["gemm_s"], si["memcpy_s"], si["attention_s"]]
    assert all(s > 0 for s in secs)
    assert si["index"] == pytest.approx(1 / np.prod(secs) ** (1 / 3))


# ----------------------------------------------------------------------------- lookup

def test_lookup_cache_first_then_repo_and_the_committed_profile_is_never_this_machine(cache, tmp_path, monkeypatch):
    from core.results import write_json_atomic

    assert lookup.find(CPU, "smollm2") is None
    monkeypatch.setattr(lookup, "REPO_PROFILES", REPO / "profiles")     # the real repo folder: no fingerprint
    assert lookup.find(CPU, "smollm2") is None
    repo = tmp_path / "repo_profiles"
    monkeypatch.setattr(lookup, "REPO_PROFILES", repo)
    write_json_atomic(repo / "here.json", this_machine_profile(1.0))
    assert lookup.find(CPU, "smollm2") == repo / "here.json"
    assert lookup.find(CPU, "no_such_model") is None
    cached = first_use.cached_path(CPU)
    write_json_atomic(cached, this_machine_profile(2.0))
    assert lookup.find(CPU, "smollm2") == cached
    other = this_machine_profile(3.0)
    other["device"]["fingerprint"] = "0123456789ab"
    write_json_atomic(cached, other)
    assert lookup.find(CPU, "smollm2") == repo / "here.json"


def test_corrupt_or_foreign_cached_profile_is_re_measured_atomically(cache, monkeypatch, capsys):
    import runtime.profile.measure as P

    calls = []

    def fake_measure(models, quick, device, repeats, existing, cover=None, bits=(2,), rag=True, progress=True):
        calls.append((models, cover, bits, rag))
        prof = this_machine_profile(5.0)
        prof["models"] = {m: prof["models"][m] for m in models}
        return prof
    monkeypatch.setattr(P, "measured_profile", fake_measure)
    steady_speed(monkeypatch, 5.0)
    path = first_use.cached_path(CPU)
    path.write_text('{"schema_version": 2, "device": {"fingerp')          # truncated
    need = lookup.Need(batch=4, context=1056, tokens=1024, bits={2})
    got = first_use.ensure(CPU, "smollm2", need, progress=False)
    assert got == path and len(calls) == 1 and calls[0][1] == need.cover()
    err = capsys.readouterr().err
    assert "corrupt" in err and "measuring one" in err and "profiled this machine" in err
    assert validate(json.loads(path.read_text()), path)["device"]["fingerprint"] == M.this_fingerprint(CPU)
    assert not list(path.parent.glob(".*.tmp"))
    # found now: not measured again
    assert first_use.ensure(CPU, "smollm2", need, progress=False) == path and len(calls) == 1
    # a cached file of another schema is re-measured too
    old = json.loads(path.read_text())
    old["schema_version"] = 1
    path.write_text(json.dumps(old))
    first_use.ensure(CPU, "smollm2", need, progress=False)
    assert len(calls) == 2 and "schema_version 1" in capsys.readouterr().err


def test_a_failed_first_use_measurement_leaves_no_profile(cache, monkeypatch):
    import runtime.profile.measure as P

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(P, "measured_profile", boom)
    steady_speed(monkeypatch, 100.0)
    with pytest.raises(KeyboardInterrupt):
        first_use.ensure(CPU, "smollm2", lookup.Need(), progress=False)
    assert not [p for p in (cache / "profiles").glob("*") if p.is_file()]


def test_need_and_covering_grids():
    from omegaconf import OmegaConf

    from runtime.profile.grids import kernel_axes, model_args

    cfg = OmegaConf.create({"workload": {"arrival": "static", "batch": 4, "prompt_len": 4096, "gen_len": 32,
                                         "n_requests": 8},
                            "policy": {"name": "specache", "bits": 1, "k": 64, "prefetch": True},
                            "scheduler": {"max_batch": 256}})
    n = lookup.need_of(cfg)
    assert (n.batch, n.context, n.tokens, n.bits, n.rag) == (8, 4128, 4096, {1}, False)   # 2 query rows per request
    cfg.workload.arrival = "poisson"
    cfg.policy = {"name": "full"}
    assert lookup.need_of(cfg).batch == 8 and lookup.need_of(cfg).bits == set()          # n_requests
    axes = kernel_axes(model_args("smollm2"), True, CPU, cover=n.cover(), bits=(1,), rag=False)
    assert axes["decode_attention_full"]["batch"][-1] >= 8 and axes["decode_attention_full"]["context"][-1] >= 4128
    assert axes["prefill_layer"]["tokens"][-1] >= 4096
    assert "decode_attention_kivi_1bit" in axes and "decode_attention_kivi" in axes and "decode_attention_kivi_4bit" not in axes
    assert "selective_prefill" not in axes
    # RAG points: the recomputed-token axis m follows the prompt (8 chunks x 512 + a question
    # recompute ceil(0.15 x 4160) + 32 = 656 tokens; the quick grid stops at 256)
    rag_axes = kernel_axes(model_args("smollm2"), True, CPU, cover={"batch": 1, "context": 4192, "tokens": 4160})
    assert rag_axes["selective_prefill"]["m"][-1] >= 4160
    assert kernel_axes(model_args("smollm2"), True, CPU)["selective_prefill"]["m"] == [16, 64, 256]
    assert kernel_axes(model_args("smollm2"), True, CPU)["decode_attention_full"]["batch"] == [1, 4]   # --quick unchanged
    prof = this_machine_profile()
    small = lookup.Need(batch=4, context=1056, tokens=1024)
    assert lookup.covers(prof, "smollm2", small)
    assert not lookup.covers(prof, "smollm2", lookup.Need(batch=64, context=1056, tokens=1024))
    assert not lookup.covers(prof, "smollm2", lookup.Need(batch=1, context=100, tokens=10, bits={1}))


def test_schema_2_measured_profile_needs_fingerprint_and_speed_index():
    prof = this_machine_profile()
    validate(prof, "p.json")
    for drop in (("device", "fingerprint"), ("speed_index",)):
        bad = copy.deepcopy(prof)
        if len(drop) == 2:
            del bad[drop[0]][drop[1]]
        else:
            del bad[drop[0]]
        with pytest.raises(ProfileError, match=drop[-1]):
            validate(bad, "p.json")


# ----------------------------------------------------------------------------- simulator

def test_simulator_run_says_which_machine_it_predicts(cache):
    from analysis.validate import compose_config
    from simulator.run import simulate

    cfg = compose_config("simulate", ["model=tiny", "hardware=cpu", "workload.batch=1", "workload.prompt_len=64",
                                      "workload.gen_len=4", f"results_dir={cache.parent}"])
    rec = simulate(cfg)
    assert rec["provenance"]["profile"].endswith("cpu-intel-r-xeon-r-processor-2c.json")
    assert rec["provenance"]["predicts"] != "this machine" and "Intel" in rec["provenance"]["predicts"]
    from core.results import write_json_atomic

    write_json_atomic(first_use.cached_path(CPU), this_machine_profile())
    rec = simulate(cfg)
    assert rec["provenance"]["predicts"] == "this machine"
    assert Path(rec["provenance"]["profile"]) == first_use.cached_path(CPU)


def test_compute_scale_multiplies_kernels_not_transfers():
    from analysis.validate import compose_config
    from simulator.costs import Costs
    from simulator.run import simulate

    a, b = Costs.load(COMMITTED, "smollm2"), Costs.load(COMMITTED, "smollm2")
    b.compute_scale = 2.0
    assert b.table("prefill_layer")(300) == pytest.approx(2 * a.table("prefill_layer")(300))
    assert b.table("decode_layer")(2, 700) == pytest.approx(2 * a.table("decode_layer")(2, 700))
    assert b.table("h2d_pinned")(1 << 20) == pytest.approx(a.table("h2d_pinned")(1 << 20))
    cfg = compose_config("simulate", ["model=smollm2", f"hardware.profile={COMMITTED}", "workload.batch=1",
                                      "workload.prompt_len=256", "workload.gen_len=8", "results_dir=/tmp/kvtestbed-t"])
    r1, r2 = simulate(cfg), simulate(cfg, compute_scale=2.0)
    # a full cache without a link is all compute: every step takes twice as long
    assert r2["tpot_s"] == pytest.approx(2 * r1["tpot_s"], rel=1e-9)
    assert r2["ttft_s"] == pytest.approx(2 * r1["ttft_s"], rel=1e-9)


def _with_bits_tables(prof: dict, model: str, factor: float) -> dict:
    prof = copy.deepcopy(prof)
    k = prof["models"][model]["kernels"]
    for name in ("decode_attention_kivi", "score_topk", "gather_replace", "quantize"):
        t = copy.deepcopy(k[name])
        for q in ("p10", "p50", "p90"):
            t[q] = (np.asarray(t[q]) * factor).tolist()
        k[f"{name}_1bit"] = t
    return prof


def test_twins_read_the_table_of_their_bits():
    from simulator.costs import Costs, ModelShape
    from simulator.policies import Kivi, Specache

    prof = _with_bits_tables(json.loads(COMMITTED.read_text()), "smollm2", 3.0)
    c = Costs(COMMITTED, prof, "smollm2")
    s = ModelShape(30, 3, 64, "float32")
    B, ctx = 1, 1500
    one, two = Kivi(bits=1), Kivi(bits=2)
    step = lambda pol: sum(o.seconds for o in pol.decode_graph(c, s, B, ctx))  # noqa: E731
    a1 = c.table("decode_attention_kivi_1bit")(B, ctx)
    a2 = c.table("decode_attention_kivi")(B, ctx)
    assert a1 == pytest.approx(3 * a2)
    # a decode layer of kivi = whole-model full layer + (kivi attention - full attention), per layer
    assert step(one) - step(two) == pytest.approx(s.n_layers * (a1 - a2), rel=1e-9)
    assert sum(o.seconds for o in one.prefill_graph(c, s, [1024])) > sum(o.seconds for o in two.prefill_graph(c, s, [1024]))
    assert "score_topk_1bit" in Specache(bits=1).tables() and "gather_replace_1bit" in Specache(bits=1).tables()
    assert step(Specache(bits=1, k=64)) > step(Specache(bits=2, k=64))
    # a measured profile without the 4-bit tables: one line naming the re-profile command
    with pytest.raises(ConfigError) as e:
        step(Kivi(bits=4))
    assert "\n" not in str(e.value) and "4-bit" in str(e.value) and "python -m runtime.profile" in str(e.value)
    # a roofline profile computes every bit-width from its formulas: 4-bit codes are more bytes
    # to read than 2-bit ones, so the step is longer (and no table is needed)
    r = Costs.load(ROOFLINE, "smollm2")
    s7 = ModelShape(30, 3, 64, "float16")
    assert sum(o.seconds for o in Kivi(bits=4).decode_graph(r, s7, 4, 2000)) > \
        sum(o.seconds for o in Kivi(bits=2).decode_graph(r, s7, 4, 2000))


# ----------------------------------------------------------------------------- noise-aware validation

def test_interval_min_max_below_five_and_bootstrap_from_five():
    from analysis.validate import interval

    x = [3.0, 1.0, 4.0, 1.5]
    assert interval(x) == (np.median(x), 1.0, 4.0, "minmax")
    y = np.array([10.0, 12.0, 11.0, 30.0, 9.0, 10.5, 11.5, 13.0, 9.5])
    med, lo, hi, kind = interval(y)
    assert kind == "bootstrap95" and med == np.median(y)
    # the percentile bootstrap of the median by hand, with numpy: the interval's ends are order
    # statistics of the sample; scipy's and ours agree to within one of them
    rng = np.random.default_rng(1)
    meds = np.median(y[rng.integers(0, len(y), size=(20000, len(y)))], axis=1)
    ref_lo, ref_hi = np.percentile(meds, [2.5, 97.5])
    srt = np.sort(y)
    rank = lambda v: np.searchsorted(srt, v)  # noqa: E731
    assert abs(rank(lo) - rank(ref_lo)) <= 1 and abs(rank(hi) - rank(ref_hi)) <= 1
    assert lo <= med <= hi and hi < 30.0           # a median's interval ignores the outlier
    assert interval([1.0, np.nan])[3] == "minmax" and interval([])[3] == ""


def test_within_noise_by_hand():
    from analysis.validate import profile_spread, table_spread, within_noise

    # measured interval [0.9, 1.1], profile spread 5 %: accepted [0.855, 1.155]
    assert within_noise(1.15, 0.9, 1.1, 0.05) and within_noise(0.86, 0.9, 1.1, 0.05)
    assert not within_noise(1.16, 0.9, 1.1, 0.05) and not within_noise(0.85, 0.9, 1.1, 0.05)
    assert within_noise(1.1, 0.9, 1.1, math.nan) and not within_noise(1.11, 0.9, 1.1, math.nan)
    # (p90 - p10) / (2 p50) per point: 0.1, 0.3, and p50 = 0 skipped -> median 0.2
    t = {"p50": [1.0, 2.0, 0.0], "p10": [0.9, 1.6, 0.0], "p90": [1.1, 2.8, 0.0]}
    assert table_spread(t) == pytest.approx(0.2)
    from omegaconf import OmegaConf

    prof = json.loads(COMMITTED.read_text())
    cfg = OmegaConf.create({"model": {"name": "smollm2"}, "policy": {"name": "full", "kv_dtype": "auto"}})
    names = ("decode_layer", "step_overhead", "lm_head_sample", "prefill_layer", "decode_attention_full")
    ref = np.median([table_spread(prof["models"]["smollm2"]["kernels"][n]) for n in names])
    assert profile_spread(cfg, COMMITTED) == pytest.approx(ref)


def test_interleaving_drift_and_columns(tmp_path, monkeypatch, capsys):
    from analysis import validate as V

    order, idx = [], iter([100.0, 100.0, 60.0, 100.0, 100.0, 100.0, 100.0, 100.0])
    monkeypatch.setattr(speed, "speed_index", lambda *a, **k: {"index": next(idx)})

    def fake_measure(entry, cfg):
        order.append(cfg.experiment.split("-", 1)[1])
        n = len(order)
        return {"path": f"m{n}.json", "ttft_s": 0.1 * n, "tpot_s": 0.01, "throughput_tok_s": 10.0 + n,
                "kv_bytes_device": 1.0, "decode_tok_s": 5.0}
    monkeypatch.setattr(V, "measure", fake_measure)
    cfg = V.compose_config("validate", [f"results_dir={tmp_path}", "progress=false", "figure=false"])
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, "experiment", "t", force_add=True)
    cfg.validation.base = ["model=tiny", "hardware=cpu", "workload.batch=1", "workload.prompt_len=48", "workload.gen_len=6",
                           f"hardware.profile={COMMITTED}"]
    cfg.validation.points = [{"id": "A", "split": "calibration", "overrides": ["policy=full"]},
                             {"id": "B", "split": "heldout", "overrides": ["policy=kivi", "policy.group_size=16",
                                                                           "policy.residual=16"]}]
    cfg.validation.repeats = 2
    cfg.validation.drift_threshold = 1.2
    cfg.validation.model_probe = False        # the speed index's path (the probe's: tests/test_cohorts_sim.py)
    df = V.validate(cfg).set_index("id")
    # speed index: 100 (start) | A 100 | B 100 -> 60: drift 0.6, re-measured -> 100: 1.67 again, flagged | A | B
    assert order == ["A", "B", "B", "A", "B"]
    assert bool(df.loc["B", "drift_flagged"]) and not bool(df.loc["A", "drift_flagged"])
    assert df.loc["B", "speed_drift"] == pytest.approx(100 / 60) and df.loc["A", "speed_drift"] == pytest.approx(1.0)
    # A's two measurements were the 1st and 4th: median and min-max by hand
    assert df.loc["A", "measured_ttft_s"] == pytest.approx(np.median([0.1, 0.4]))
    assert (df.loc["A", "measured_ttft_s_lo"], df.loc["A", "measured_ttft_s_hi"]) == pytest.approx((0.1, 0.4))
    assert df.loc["A", "ttft_s_noise"] == pytest.approx(0.15 / 0.25) and df.loc["A", "interval"] == "minmax"
    assert df.loc["A", "repeats"] == 2 and df.loc["A", "machine_fingerprint"] == M.this_fingerprint(CPU)
    assert df.loc["A", "profile_path"] == str(COMMITTED) and pd.isna(df.loc["A", "profile_fingerprint"])
    # the committed profile has no speed index: no drift correction
    assert pd.isna(df.loc["A", "predicted_ttft_s_corrected"]) and pd.isna(df.loc["A", "compute_scale"])
    p = df.loc["A"]
    spread = p.profile_spread
    assert bool(p.ttft_s_within_noise) == (0.1 * (1 - spread) <= p.predicted_ttft_s <= 0.4 * (1 + spread))
    err = capsys.readouterr().err
    assert "unfingerprinted" in err and M.this_fingerprint(CPU) in err and "speed index" in err
    text = V.format_summary(V.load(tmp_path / "validation" / "t.csv"))
    assert "within noise" in text and "drift flagged" in text and " of " in text


def test_drift_corrected_prediction_scales_by_the_speed_index_ratio(tmp_path, cache, monkeypatch):
    from analysis import validate as V
    from core.results import write_json_atomic

    prof = write_json_atomic(tmp_path / "p.json", this_machine_profile(index=100.0))
    monkeypatch.setattr(speed, "speed_index", lambda *a, **k: {"index": 50.0})      # twice as slow now
    monkeypatch.setattr(V, "measure", lambda entry, cfg: {"path": "m.json", "ttft_s": 1.0, "tpot_s": 0.1,
                                                          "throughput_tok_s": 5.0, "kv_bytes_device": 1.0})
    cfg = V.compose_config("validate", [f"results_dir={tmp_path}", "progress=false", "figure=false"])
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, "experiment", "t", force_add=True)
    cfg.validation.base = ["model=smollm2", "hardware=cpu", "workload.batch=1", "workload.prompt_len=128",
                           "workload.gen_len=4", f"hardware.profile={prof}"]
    cfg.validation.points = [{"id": "A", "split": "calibration", "overrides": ["policy=full"]}]
    cfg.validation.model_probe = False        # the speed index's path (the probe's: tests/test_cohorts_sim.py)
    r = V.validate(cfg).set_index("id").loc["A"]
    assert r.compute_scale == pytest.approx(2.0) and r.speed_index == pytest.approx(50.0)
    assert r.drift_source == "speed_index"
    assert r.predicted_tpot_s_corrected == pytest.approx(2 * r.predicted_tpot_s, rel=1e-9)
    assert r.tpot_s_rel_err_corrected == pytest.approx((r.predicted_tpot_s_corrected - 0.1) / 0.1)


def test_repeats_below_one_is_one_line(tmp_path):
    from analysis import validate as V

    cfg = V.compose_config("validate", ["experiment=validate_quick", "validation.repeats=0", f"results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="validation.repeats") as e:
        V.validate(cfg)
    assert "\n" not in str(e.value)
    assert V.interleaved(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]


def test_gpu_suite_identity_records_fingerprint_and_speed_drift(tmp_path, monkeypatch):
    from runtime import gpu_suite

    monkeypatch.setattr(gpu_suite, "OUT", tmp_path)
    idx = iter([10.0, 8.0])
    monkeypatch.setattr(speed, "speed_index", lambda *a, **k: {"index": next(idx)})
    rows = []
    gpu_suite.identity(rows)
    out = gpu_suite.identity_end(rows)
    saved = json.loads((tmp_path / "machine.json").read_text())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert saved["fingerprint"] == M.this_fingerprint(torch.device(dev)) == out["fingerprint"]
    assert saved["speed_drift"] == pytest.approx(0.8) and [r[0] for r in rows] == ["identity-start", "identity-end"]
    assert gpu_suite.STEPS[1] is gpu_suite.identity and gpu_suite.STEPS[-1] is gpu_suite.identity_end


def test_re_measuring_for_more_keeps_what_the_cache_covered(cache, monkeypatch):
    import runtime.profile.measure as P
    from core.results import write_json_atomic

    covers_seen = []

    def fake_measure(models, quick, device, repeats, existing, cover=None, bits=(2,), rag=True, progress=True):
        covers_seen.append((cover, tuple(bits), rag))
        return this_machine_profile()
    monkeypatch.setattr(P, "measured_profile", fake_measure)
    steady_speed(monkeypatch, 100.0)
    write_json_atomic(first_use.cached_path(CPU), this_machine_profile())      # 2-bit tables only
    had = lookup.coverage(this_machine_profile(), "smollm2")
    first_use.ensure(CPU, "smollm2", lookup.Need(batch=1, context=100, tokens=64, bits={4}), progress=False)
    cover, bits, rag = covers_seen[0]
    assert cover == had.cover() and bits == (2, 4) and rag == had.rag


def test_gpu_suite_help_and_dry_run_run_nothing(tmp_path, monkeypatch, capsys):
    """`--help` / `--dry-run` must not start the suite (it pip-installs and profiles)."""
    from runtime import gpu_suite

    monkeypatch.setattr(gpu_suite, "OUT", tmp_path / "out")
    ran = []
    monkeypatch.setattr(gpu_suite, "STEPS", [lambda rows: ran.append(1)])
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--help"])
    assert e.value.code == 0
    gpu_suite.main(["--dry-run"])
    assert ran == [] and not (tmp_path / "out").exists()
    assert "1. <lambda>" in capsys.readouterr().out


# ----------------------------------------------------------------------------- exact lengths, code paths, speed bracket

def test_need_keeps_the_static_points_exact_values_and_the_grids_hold_them():
    from omegaconf import OmegaConf

    from runtime.profile.grids import kernel_axes, model_args

    def cfg(batch, prompt, gen, policy, arrival="static"):
        return OmegaConf.create({"workload": {"arrival": arrival, "batch": batch, "prompt_len": prompt, "gen_len": gen,
                                              "n_requests": 8},
                                 "policy": policy, "scheduler": {"max_batch": 256}})
    full = {"name": "full"}
    spec = {"name": "specache", "bits": 2, "k": 64, "prefetch": True}
    n = lookup.need_of(cfg(1, 512, 32, full))
    assert (n.at_batch, n.at_context, n.at_tokens) == ({1}, {544}, {512})
    n = n.merge(lookup.need_of(cfg(1, 1024, 32, spec))).merge(lookup.need_of(cfg(4, 1024, 32, full)))
    poisson = lookup.need_of(cfg(1, 256, 16, full, arrival="poisson"))
    assert (poisson.at_batch, poisson.at_context, poisson.at_tokens) == (set(), set(), set())   # maxima only
    n = n.merge(poisson)
    assert (n.batch, n.context, n.tokens) == (8, 1056, 1024)
    assert (n.at_batch, n.at_context, n.at_tokens) == ({1, 2, 4}, {544, 1056}, {512, 1024})
    assert "prefill at 512, 1024" in n.describe()
    axes = kernel_axes(model_args("smollm2"), True, CPU, cover=n.cover(), bits=(2,), rag=False)
    assert axes["prefill_layer"]["tokens"] == [16, 64, 256, 512, 1024]
    assert axes["quantize"]["tokens"] == [16, 64, 256, 512, 1024]
    assert axes["decode_attention_full"] == {"batch": [1, 2, 4, 8], "context": [256, 544, 1024, 1056, 2048]}
    assert axes["decode_attention_kivi"] == axes["decode_attention_full"]
    assert axes["lm_head_sample"]["batch"] == [1, 2, 4, 8]
    assert kernel_axes(model_args("smollm2"), True, CPU)["prefill_layer"]["tokens"] == [16, 64, 256, 1024]
    # a cached profile is reused only when the exact values are grid points
    prof = this_machine_profile()          # the committed full grids: tokens 16..8192, batch 1..16 (decode_layer 1, 2, 4)
    assert lookup.covers(prof, "smollm2", lookup.Need(batch=4, context=1056, tokens=1024, at_tokens={512}, at_batch={2}))
    assert not lookup.covers(prof, "smollm2", lookup.Need(batch=4, context=1056, tokens=1024, at_tokens={500}))
    assert not lookup.covers(prof, "smollm2", lookup.Need(batch=4, context=1056, tokens=1024, at_batch={3}))
    assert not lookup.covers(prof, "smollm2", lookup.Need(batch=4, context=1056, tokens=1024, at_context={544}))
    assert lookup.covers(prof, "smollm2", lookup.Need(batch=4, context=1056, tokens=1024, at_context={1024}))
    # a re-measure for more keeps the exact values the cached profile was measured for
    prof["models"]["smollm2"]["first_use_at"] = {"batch": [2], "context": [544], "tokens": [512]}
    had = lookup.coverage(prof, "smollm2")
    assert (had.at_batch, had.at_context, had.at_tokens) == ({2}, {544}, {512})


def test_code_path_rule_lives_in_core_and_the_runtime_reads_its_switch(monkeypatch):
    from core.profile.schema import current_code_path
    from runtime.kv import lowbit_cpu

    monkeypatch.delenv("KVTESTBED_LOWBIT_KERNEL", raising=False)
    assert current_code_path("cpu", "decode_attention_kivi", True) == "fused_cpu"
    assert current_code_path("cpu", "score_topk_1bit", True) == "fused_cpu"
    assert current_code_path("cpu", "gather_replace_4bit", False) == "torch"         # no compiler / failed build
    assert current_code_path("cpu", "quantize", True) == "torch"                     # packs in torch always
    assert current_code_path("cpu", "prefill_layer", True) == "torch"
    assert current_code_path("cuda", "decode_attention_kivi") == current_code_path("cuda", "mlp") == "cuda"
    assert lowbit_cpu.enabled() and lowbit_cpu.ENV == "KVTESTBED_LOWBIT_KERNEL"
    monkeypatch.setenv("KVTESTBED_LOWBIT_KERNEL", "0")
    assert current_code_path("cpu", "decode_attention_kivi", True) == "torch" and not lowbit_cpu.enabled()


def test_a_profile_timed_on_another_code_path(cache, monkeypatch):
    """schema 3: refused by the simulator in one line naming the re-measure command, not found by
    the lookup (re-measured); an older schema (no code_path: torch) is read with one stderr line."""
    from core.profile.schema import current_code_path
    from core.results import write_json_atomic
    from simulator import costs as C

    monkeypatch.delenv("KVTESTBED_LOWBIT_KERNEL", raising=False)
    prof = this_machine_profile()
    k = prof["models"]["smollm2"]["kernels"]
    other = "torch" if current_code_path("cpu", "decode_attention_kivi") == "fused_cpu" else "fused_cpu"
    k["decode_attention_kivi"]["code_path"] = other
    validate(prof, "p.json")
    assert not lookup.covers(prof, "smollm2", None)
    write_json_atomic(first_use.cached_path(CPU), prof)
    notes: list[str] = []
    assert lookup.find(CPU, "smollm2", None, notes) is None
    assert "timed on another code path" in notes[0] and "decode_attention_kivi" in notes[0]
    c = C.Costs(COMMITTED, prof, "smollm2")
    c.table("decode_attention_full")                                      # same path: read
    with pytest.raises(ConfigError) as e:
        c.table("decode_attention_kivi")
    msg = str(e.value)
    assert "\n" not in msg and f"timed on the {other} code path" in msg and "python -m runtime.profile --model smollm2" in msg
    # an older schema: no code_path, read as torch; where the runtime takes fused_cpu now, one
    # warning (one line, naming the profile and its tables), once per profile and model
    import warnings

    monkeypatch.setattr(C, "_WARNED", set())
    old = json.loads(COMMITTED.read_text())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            C.Costs(COMMITTED, old, "smollm2").table("decode_attention_kivi")
            C.Costs(COMMITTED, old, "smollm2").table("score_topk")
    seen = [w for w in seen if issubclass(w.category, C.CodePathWarning)]
    if current_code_path("cpu", "decode_attention_kivi") == "fused_cpu":
        assert len(seen) == 1 and seen[0].filename == str(COMMITTED) and seen[0].lineno == 0
        msg = str(seen[0].message)
        assert "\n" not in msg and "no code_path: read as torch" in msg and "python -m runtime.profile" in msg
        assert "{decode_attention_kivi, score_topk, gather_replace}" in msg
    else:
        assert seen == []
    monkeypatch.setenv("KVTESTBED_LOWBIT_KERNEL", "0")                    # the torch path: nothing to say
    monkeypatch.setattr(C, "_WARNED", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        C.Costs(COMMITTED, old, "smollm2").table("decode_attention_kivi")
    assert not [w for w in seen if issubclass(w.category, C.CodePathWarning)]


def test_schema_3_tables_say_their_code_path_and_older_schemas_still_load():
    prof = this_machine_profile()
    assert SCHEMA_VERSION == 3
    validate(prof, "p.json")
    bad = copy.deepcopy(prof)
    del bad["models"]["smollm2"]["kernels"]["mlp"]["code_path"]
    with pytest.raises(ProfileError, match="mlp lacks 'code_path'"):
        validate(bad, "p.json")
    bad["models"]["smollm2"]["kernels"]["mlp"]["code_path"] = "opencl"
    with pytest.raises(ProfileError, match="code_path='opencl'"):
        validate(bad, "p.json")
    for ver in (1, 2):            # the committed profiles are older: no code_path, read as torch
        old = copy.deepcopy(prof)
        old["schema_version"] = ver
        for t in old["models"]["smollm2"]["kernels"].values():
            t.pop("code_path", None)
        validate(old, "p.json")


def test_first_use_profile_is_bracketed_by_the_speed_index(cache, monkeypatch, capsys):
    import runtime.profile.measure as P

    def run(afters):
        calls = []

        def fake_measure(models, quick, device, repeats, existing, cover=None, bits=(2,), rag=True, progress=True):
            calls.append(1)
            return this_machine_profile(afters[len(calls) - 1])
        monkeypatch.setattr(P, "measured_profile", fake_measure)
        got = first_use.ensure(CPU, "smollm2", lookup.Need(batch=1, context=100, tokens=64), progress=False)
        return got, len(calls), capsys.readouterr().err

    steady_speed(monkeypatch, 100.0)
    got, n, err = run([119.0])                                   # within 20%: measured once, cached
    assert n == 1 and got == first_use.cached_path(CPU) and "measuring it again" not in err
    first_use.cached_path(CPU).unlink()
    got, n, err = run([130.0, 140.0])                            # moved, then steady: measured twice, cached
    assert n == 2 and got == first_use.cached_path(CPU) and "measuring it again" in err
    brackets = json.loads(got.read_text())["provenance"]["first_use"]["speed_brackets"]
    assert [(b["before"], b["after"]) for b in brackets] == [(100.0, 130.0), (130.0, 140.0)]
    first_use.cached_path(CPU).unlink()
    got, n, err = run([70.0, 100.0])                             # moved twice: used for this run, not cached
    assert n == 2 and got != first_use.cached_path(CPU) and got.is_file()
    assert not first_use.cached_path(CPU).exists()
    lines = [ln for ln in err.splitlines() if "not cached" in ln]
    assert len(lines) == 1 and str(got) in lines[0]
    got.unlink()
