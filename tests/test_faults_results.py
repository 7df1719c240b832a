"""Faults in writing and resuming results (analysis.validate, analysis.sweep): two writers into one
folder, a run killed between its halves or after some points, identifiers that look like numbers,
a half missing, another profile. Measuring and predicting are monkeypatched (the tiny model's
configs, records made up here), so these run in seconds; a kill -9 is a real SIGKILL of a child
process where the order of events matters. The cases and their before/after are tallied in
tests/fault_cases_results.md."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis import sweep as S
from analysis import validate as V

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "profiles/cpu-intel-r-xeon-r-processor-2c.json"
TINY = ["model=tiny", "hardware=cpu", "workload.batch=1", "workload.prompt_len=48", "workload.gen_len=6"]
FP = "012345678901"            # all digits with a leading zero: read as a number it never matches again
POINTS = [{"id": "full", "split": "calibration", "overrides": ["policy=full"]},
          {"id": "kivi", "split": "heldout", "overrides": ["policy=kivi", "policy.group_size=16", "policy.residual=16"]}]


_COMPOSED: dict = {}


@pytest.fixture(autouse=True)
def compose_once(monkeypatch):
    """Hydra composes a config in ~0.3 s: the same overrides are composed once per session (a
    copy each time), so the many runs below cost what their points cost."""
    import analysis.compose as C

    real = C.compose_config

    def cached(name, overrides):
        rd = [o for o in overrides if o.startswith("results_dir=")]
        key = (name, tuple(o for o in overrides if o not in rd))
        if key not in _COMPOSED:
            _COMPOSED[key] = real(name, list(key[1]))
        cfg = copy.deepcopy(_COMPOSED[key])
        if rd:
            cfg.results_dir = rd[-1].split("=", 1)[1]
        return cfg

    for mod in (C, V, S):
        monkeypatch.setattr(mod, "compose_config", cached)


def record(path: str, scale: float = 1.0) -> dict:
    return {"path": path, "throughput_tok_s": 100.0 * scale, "ttft_s": 0.1 / scale, "tpot_s": 0.01 / scale,
            "decode_tok_s": 110.0 * scale, "kv_bytes_device": 4096, "phases": None}


class FakeSpeed:
    def __init__(self, device, shape, probe=None):
        pass

    def probes_for(self, job):
        return []

    def next(self):
        return 1.0, 1.0


class Calls:
    """What the fakes were asked to do."""

    def __init__(self):
        self.measured: list[str] = []
        self.predicted: list[str] = []


def patch(monkeypatch, calls: Calls, fp: str = FP, measure=None, predict=None):
    def fake_measure(entry, cfg):
        calls.measured.append(cfg.experiment)
        return record(f"/m/{cfg.experiment}.json", 1.0)

    def fake_predict(cfg, compute_scale=1.0):
        calls.predicted.append(cfg.experiment)
        return record(f"/s/{cfg.experiment}.json", 1.25)

    monkeypatch.setattr(V, "measure", measure or fake_measure)
    monkeypatch.setattr("analysis.halves.predict", predict or fake_predict)
    monkeypatch.setattr(V, "Speed", FakeSpeed)
    monkeypatch.setattr("core.machine.this_fingerprint", lambda device="cpu": fp)


def config(tmp_path, points=POINTS, profile=PROFILE, **top):
    cfg = V.compose_config("validate", [f"results_dir={tmp_path}", "progress=false", "figure=false"])
    OmegaConf.update(cfg, "experiment", "t", force_add=True)
    cfg.validation.base = TINY
    cfg.validation.points = points
    cfg.overrides = [f"hardware.profile={profile}"]
    for k, v in top.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def table(tmp_path) -> pd.DataFrame:
    return V.load(tmp_path / "validation" / "t.csv").set_index("id")


# ----------------------------------------------------------------------------- concurrent writers

def test_merge_rows_from_threads_keeps_every_row(tmp_path):
    from analysis.table import merge_rows

    path = tmp_path / "m.csv"

    def writer(w):
        for i in range(25):
            merge_rows(path, {f"w{w}-{i}": {"id": f"w{w}-{i}", "status": "ok", "x": i}})

    ts = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    df = pd.read_csv(path)
    assert len(df) == 100 and df.id.is_unique
    assert not list(tmp_path.glob(".m.csv.*.tmp"))         # every temp file renamed or removed


CHILD = """
import os, sys, time, json
from pathlib import Path
sys.path.insert(0, {tests!r})
import pytest
from test_faults_results import *
args = json.loads(sys.argv[1])
mp = pytest.MonkeyPatch()
calls = Calls()
tmp = Path(args["tmp"])

def measure(entry, cfg):                   # both runs have read the table before either writes
    me = cfg.experiment.rsplit("-", 1)[1]
    (tmp / f"started-{{me}}").touch()
    for _ in range(600):
        if all((tmp / f"started-{{p}}").exists() for p in args["wait"]):
            break
        time.sleep(0.05)
    return record(f"/m/{{cfg.experiment}}.json")

def predict(cfg, compute_scale=1.0):
    if args.get("kill_in_predict"):
        os.kill(os.getpid(), signal.SIGKILL)
    return record(f"/s/{{cfg.experiment}}.json", 1.25)

patch(mp, calls, measure=measure, predict=predict)
V.validate(config(tmp, only=args["only"]))
"""


def child(tmp_path, **args) -> subprocess.Popen:
    code = textwrap.dedent(CHILD.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps({"tmp": str(tmp_path), **args})], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_that_finishes_while_another_measures_keeps_both_rows(tmp_path, monkeypatch):
    """Run A (only=[full]) has read the table and is measuring when run B (only=[kivi]) runs
    whole; A writes after B: B's row must still be there."""
    inner = {"ran": False}

    def measure(entry, cfg):
        if not inner["ran"]:
            inner["ran"] = True
            V.validate(config(tmp_path, only=["kivi"]))
        return record(f"/m/{cfg.experiment}.json")

    patch(monkeypatch, Calls(), measure=measure)
    V.validate(config(tmp_path, only=["full"]))
    df = table(tmp_path)
    assert sorted(df.index) == ["full", "kivi"] and df.predicted_ttft_s.notna().all()
    assert df.index.tolist() == ["full", "kivi"]                     # the experiment's order


@pytest.mark.slow
def test_two_validate_runs_with_different_only_keep_both_rows(tmp_path):
    a = child(tmp_path, only=["full"], wait=["full", "kivi"])
    b = child(tmp_path, only=["kivi"], wait=["full", "kivi"])
    for p in (a, b):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    df = table(tmp_path)
    assert sorted(df.index) == ["full", "kivi"]
    assert df.predicted_ttft_s.notna().all() and (df.status == "ok").all()


# ----------------------------------------------------------------------------- kill -9, then resume

def test_stopped_after_measuring_before_predicting_then_resume_predicts(tmp_path, monkeypatch):
    def stop(cfg, compute_scale=1.0):
        raise KeyboardInterrupt             # not an Exception: it stops the run as a kill would

    patch(monkeypatch, Calls(), predict=stop)
    with pytest.raises(KeyboardInterrupt):
        V.validate(config(tmp_path))
    calls = Calls()
    patch(monkeypatch, calls)
    df = V.validate(config(tmp_path))
    assert calls.measured == [] and sorted(calls.predicted) == ["t-full", "t-kivi"]
    assert df.predicted_ttft_s.notna().all() and V.summary(df).points.sum() == 2 * len(V.HEADLINE)
    assert "not predicted" not in V.format_summary(df)


@pytest.mark.slow
def test_kill_9_after_measuring_before_predicting_then_resume_predicts(tmp_path, monkeypatch):
    p = child(tmp_path, only=["full", "kivi"], wait=[], kill_in_predict=True)
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    before = table(tmp_path)                       # what the kill left: measured, not predicted
    assert before.measured_ttft_s.notna().all()
    assert "predicted_ttft_s" not in before or before.predicted_ttft_s.isna().all()
    calls = Calls()
    patch(monkeypatch, calls)
    df = V.validate(config(tmp_path)).set_index("id")
    assert calls.measured == []                    # measurements are never redone for a missing half
    assert sorted(calls.predicted) == ["t-full", "t-kivi"]
    assert df.predicted_ttft_s.notna().all()
    assert V.summary(df.reset_index()).points.sum() == 2 * len(V.HEADLINE)   # both points counted


def test_killed_mid_repeats_is_measured_again(tmp_path, monkeypatch):
    n = {"runs": 0}

    def dies_on_second(entry, cfg):
        n["runs"] += 1
        if n["runs"] == 2:
            raise KeyboardInterrupt          # not an Exception: it stops the run as a kill would
        return record(f"/m/{cfg.experiment}.json")

    patch(monkeypatch, Calls(), measure=dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        V.validate(config(tmp_path, points=POINTS[:1], **{"validation.repeats": 2}))
    assert table(tmp_path).loc["full", "repeats"] == 1
    calls = Calls()
    patch(monkeypatch, calls)
    df = V.validate(config(tmp_path, points=POINTS[:1], **{"validation.repeats": 2})).set_index("id")
    assert calls.measured == ["t-full", "t-full"] and df.loc["full", "repeats"] == 2


def test_all_digit_fingerprint_round_trips_and_resumes(tmp_path, monkeypatch):
    calls = Calls()
    patch(monkeypatch, calls)
    V.validate(config(tmp_path))
    assert table(tmp_path).machine_fingerprint.tolist() == [FP, FP]
    again = Calls()
    patch(monkeypatch, again)
    V.validate(config(tmp_path))
    assert again.measured == [] and again.predicted == []      # both halves there: nothing redone


def test_halves_runtime_into_a_table_without_predictions_then_simulator_round_trip(tmp_path, monkeypatch, capsys):
    calls = Calls()
    patch(monkeypatch, calls)
    cfg = config(tmp_path, halves="runtime", figure=True)
    df = V.validate(cfg)
    assert "predicted_ttft_s" not in df and calls.predicted == []
    text = V.format_points(df) + V.format_summary(df)
    assert "measured, not predicted (2" in text and "halves=simulator" in text
    # the printed report of the CLI too (figures, phases) from a table without predicted columns
    with monkeypatch.context() as m:
        m.setattr(V, "compose_config", lambda name, argv: cfg)
        V.main(["experiment=t"])
    assert "full" in capsys.readouterr().out
    # halves=runtime again resumes what it measured
    again = Calls()
    patch(monkeypatch, again)
    V.validate(config(tmp_path, halves="runtime"))
    assert again.measured == []
    # halves=simulator predicts them; then a plain run has nothing left to do
    patch(monkeypatch, again)
    df = V.validate(config(tmp_path, halves="simulator"))
    assert sorted(again.predicted) == ["t-full", "t-kivi"] and df.predicted_ttft_s.notna().all()
    last = Calls()
    patch(monkeypatch, last)
    V.validate(config(tmp_path))
    assert last.measured == [] and last.predicted == []


def test_halves_simulator_takes_rows_measured_on_another_machine(tmp_path, monkeypatch):
    patch(monkeypatch, Calls(), fp="999999999999")           # the GPU box
    V.validate(config(tmp_path, halves="runtime"))
    calls = Calls()
    patch(monkeypatch, calls)                                 # this box
    df = V.validate(config(tmp_path, halves="simulator")).set_index("id")
    assert calls.measured == [] and len(calls.predicted) == 2
    assert df.machine_fingerprint.tolist() == ["999999999999"] * 2 and (df.status == "ok").all()


# ----------------------------------------------------------------------------- another profile

def _other_profile(tmp_path) -> Path:
    out = tmp_path / "other.json"
    out.write_text(json.dumps(json.loads((ROOT / PROFILE).read_text()), indent=1))   # same content, other bytes
    return out


def test_another_hardware_profile_is_predicted_again(tmp_path, monkeypatch):
    patch(monkeypatch, Calls())
    V.validate(config(tmp_path))
    other = _other_profile(tmp_path)
    calls = Calls()
    patch(monkeypatch, calls)
    df = V.validate(config(tmp_path, profile=str(other))).set_index("id")
    assert calls.measured == [] and sorted(calls.predicted) == ["t-full", "t-kivi"]
    assert (df.profile_path == str(other)).all()


def test_the_same_profile_path_with_other_bytes_is_predicted_again(tmp_path, monkeypatch):
    prof = tmp_path / "p.json"
    shutil.copy(ROOT / PROFILE, prof)
    patch(monkeypatch, Calls())
    V.validate(config(tmp_path, profile=str(prof)))
    prof.write_text(json.dumps(json.loads(prof.read_text()), indent=2))     # re-profiled in place
    calls = Calls()
    patch(monkeypatch, calls)
    V.validate(config(tmp_path, profile=str(prof)))
    assert calls.measured == [] and len(calls.predicted) == 2


def test_committed_reference_resumes_its_measurements_and_predicts_again(tmp_path, monkeypatch):
    ref = pd.read_csv(ROOT / "results/reference/validation/validate_cpu.csv", dtype=str)
    assert "profile_sha256" not in ref          # written before the column existed
    (tmp_path / "reference" / "validation").mkdir(parents=True)
    shutil.copy(ROOT / "results/reference/validation/validate_cpu.csv", tmp_path / "reference" / "validation")
    row = ref.set_index("id").loc["full_b1_p512"]
    calls = Calls()
    patch(monkeypatch, calls, fp=row.machine_fingerprint,
          measure=lambda *a: pytest.fail("a committed measurement was measured again"))
    cfg = V.compose_config("validate", ["experiment=validate_cpu", f"results_dir={tmp_path}", "progress=false",
                                        "figure=false", "only=[full_b1_p512]", f"overrides=['hardware.profile={PROFILE}']"])
    df = V.validate(cfg).set_index("id")
    assert calls.predicted == ["validate_cpu-full_b1_p512"]        # the prediction, cheap, is redone
    assert df.loc["full_b1_p512", "measured_ttft_s"] == pytest.approx(float(row.measured_ttft_s))
    assert len(df) == len(ref)                                      # the other reference rows came along
    assert (tmp_path / "reference/validation/validate_cpu.csv").read_text() == \
        (ROOT / "results/reference/validation/validate_cpu.csv").read_text()


# ----------------------------------------------------------------------------- analysis.sweep

def sweep_cfg(tmp_path):
    cfg = S.compose_config("sweep", ["experiment=sweep_k_bits_r", f"results_dir={tmp_path}", "progress=false",
                                     f"evals_dir={tmp_path}"])
    cfg.sweep.base = ["model=tiny", f"hardware.profile={PROFILE}", "workload.batch=1", "workload.prompt_len=48",
                      "workload.gen_len=6"]
    cfg.sweep.grids = [{"name": "kivi", "overrides": ["policy=kivi", "policy.group_size=16", "policy.residual=16"],
                        "axes": {"policy.bits": [1, 2, 4, 8]}},
                       {"name": "base", "overrides": [], "axes": {"policy": ["full", "offload"]}}]
    return cfg


def fake_simulate(calls: list, die_after: int | None = None):
    def simulate(cfg, compute_scale=1.0):
        if die_after is not None and len(calls) == die_after:
            raise KeyboardInterrupt
        calls.append(cfg.policy.name + str(cfg.policy.get("bits", "")))
        return {**record("/s/x.json"), "kv_bytes_host": 0, "kv_ratio_vs_fp16": 1.0, "extrapolated": []}
    return simulate


def test_sweep_killed_after_n_points_resumes_where_it_stopped(tmp_path, monkeypatch):
    first: list = []
    monkeypatch.setattr("simulator.run.simulate", fake_simulate(first, die_after=3))
    with pytest.raises(KeyboardInterrupt):
        S.sweep(sweep_cfg(tmp_path))
    store = tmp_path / "sweep" / "sweep_k_bits_r.points.csv"
    assert store.exists() and len(pd.read_csv(store)) == 3          # what finished is on disk
    second: list = []
    monkeypatch.setattr("simulator.run.simulate", fake_simulate(second))
    df = S.sweep(sweep_cfg(tmp_path))
    assert second == ["kivi8", "full", "offload"]                  # only the points not done
    assert len(df) == 6 and (df.status == "ok").all() and df.config_hash.is_unique
    assert len(pd.read_csv(tmp_path / "sweep" / "sweep_k_bits_r.csv")) == 6


@pytest.mark.slow
def test_sweep_kill_9_after_n_points_then_resume(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import pytest
        from pathlib import Path
        from test_faults_results import *
        calls = []
        def simulate(cfg, compute_scale=1.0):
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return fake_simulate(calls)(cfg)
        mp = pytest.MonkeyPatch()
        mp.setattr("simulator.run.simulate", simulate)
        S.sweep(sweep_cfg(Path({str(tmp_path)!r})))
        """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "sweep" / "sweep_k_bits_r.points.csv")) == 2


def test_sweep_all_digit_config_hash_round_trips(tmp_path, monkeypatch):
    hashes = iter(f"0{i:011d}" for i in range(100))
    seen: dict = {}

    def digit_hash(grid, overrides, cfg):
        key = (grid, tuple(overrides))
        if key not in seen:
            seen[key] = next(hashes)
        return seen[key]

    monkeypatch.setattr(S, "point_hash", digit_hash, raising=False)
    first: list = []
    monkeypatch.setattr("simulator.run.simulate", fake_simulate(first))
    S.sweep(sweep_cfg(tmp_path))
    again: list = []
    monkeypatch.setattr("simulator.run.simulate", fake_simulate(again))
    df = S.sweep(sweep_cfg(tmp_path))
    assert again == [] and len(df) == 6
    assert pd.read_csv(tmp_path / "sweep" / "sweep_k_bits_r.points.csv", dtype=str).config_hash.str.len().eq(12).all()


def test_sweep_resume_false_and_failed_points_run_again(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr("simulator.run.simulate", fake_simulate(calls))
    S.sweep(sweep_cfg(tmp_path))
    cfg = sweep_cfg(tmp_path)
    cfg.resume = False
    S.sweep(cfg)
    assert len(calls) == 12
    store = tmp_path / "sweep" / "sweep_k_bits_r.points.csv"
    df = pd.read_csv(store, dtype=str, keep_default_na=False)
    df.loc[0, "status"] = "RuntimeError: boom"
    df.to_csv(store, index=False)
    calls.clear()
    S.sweep(sweep_cfg(tmp_path))
    assert calls == ["kivi1"]


def test_sweep_rows_read_back_like_fresh_ones(tmp_path, monkeypatch):
    """A resumed row is the row that was written: empty strings stay empty, NaN stays NaN."""
    monkeypatch.setattr("simulator.run.simulate", fake_simulate([]))
    fresh = S.sweep(sweep_cfg(tmp_path))
    resumed = S.sweep(sweep_cfg(tmp_path))
    for c in ("selector", "extrapolated", "label", "policy"):
        assert resumed[c].tolist() == fresh[c].tolist(), c
    assert math.isnan(resumed.rate.iloc[0]) and resumed.k.tolist() == pytest.approx(fresh.k.tolist(), nan_ok=True)
