"""analysis/phases.py: measured vs predicted phase by phase (hand-computed cases), and
analysis.validate writing the phases CSV beside the main one."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis import phases as P
from core.phases import PHASES, columns, phase_of, stage_record


def _rec(step, **ph):
    """A `phases` record of one decode stage with per-step seconds `ph`."""
    return {"decode": stage_record({k: 10 * v for k, v in ph.items()}, step * 10, 10)}


def test_stage_record_by_hand():
    r = stage_record({"layer": 0.8, "lm_head": 0.1}, 1.0, 10, parts={"mlp": 0.3, "attention": 0.2})
    assert r["steps"] == 10 and r["step_s"] == pytest.approx(0.1)
    assert r["phases"]["layer"]["s"] == pytest.approx(0.08) and r["phases"]["layer"]["share"] == pytest.approx(0.8)
    assert r["phases"]["unaccounted"]["s"] == pytest.approx(0.1 - 0.08 - 0.01)
    assert r["parts"]["mlp"]["share"] == pytest.approx(0.3)
    with pytest.raises(ValueError):
        stage_record({"lyer": 1.0}, 1.0, 1)


def test_phase_of_op_names():
    assert [phase_of(n) for n in ("layer12", "fetch0_next", "store3", "overhead", "lm_head", "load_features")] == \
        ["layer", "fetch", "store", "overhead", "lm_head", "load"]
    with pytest.raises(ValueError):
        phase_of("bogus7")


def test_measured_columns_are_medians_over_repeats():
    recs = [{"phases": _rec(0.10, layer=0.08, lm_head=0.01)}, {"phases": _rec(0.12, layer=0.10, lm_head=0.01)},
            {"phases": _rec(0.30, layer=0.28, lm_head=0.01)}, {"phases": None}]
    c = P.measured_phase_columns(recs)
    assert c["measured_phase_decode_layer_s"] == pytest.approx(0.10)          # median of 0.08, 0.10, 0.28
    assert c["measured_phase_decode_step_s"] == pytest.approx(0.12)
    assert P.measured_phase_columns([{"path": "old.json"}]) == {}              # a record from before phases


def test_blame_names_the_phase_that_carries_the_error():
    row = {**columns(_rec(0.100, layer=0.080, fetch=0.010, lm_head=0.010), "measured"),
           **columns(_rec(0.070, layer=0.058, fetch=0.002, lm_head=0.010), "predicted")}
    b = P.blame(row, "decode")
    # under-predicted by 30 ms: layer -22 ms, fetch -8 ms, lm_head 0, unaccounted 0 (measured 0)
    assert b["phase"] == "layer" and b["diff_s"] == pytest.approx(-0.022) and b["step_diff_s"] == pytest.approx(-0.030)
    over = {**columns(_rec(0.100, layer=0.060, fetch=0.030, lm_head=0.010), "measured"),
            **columns(_rec(0.150, layer=0.062, fetch=0.078, lm_head=0.010), "predicted")}
    assert P.blame(over, "decode")["phase"] == "fetch"
    assert P.blame({}, "decode") is None


def test_stage_of_throughput_weighs_steps_per_request():
    row = {"gen_len": 33, "measured_phase_prefill_step_s": 1.0, "predicted_phase_prefill_step_s": 1.2,
           "measured_phase_decode_step_s": 0.050, "predicted_phase_decode_step_s": 0.060}
    assert P.stage_of(row, "ttft_s") == "prefill" and P.stage_of(row, "tpot_s") == "decode"
    assert P.stage_of(row, "throughput_tok_s") == "decode"          # 32 x 10 ms > 200 ms
    assert P.stage_of({**row, "gen_len": 5}, "throughput_tok_s") == "prefill"


def test_explain_only_points_off_by_more_than_noise():
    df = pd.DataFrame([
        {"id": "a", "status": "ok", "tpot_s_rel_err": -0.30, "tpot_s_within_noise": False},
        {"id": "b", "status": "ok", "tpot_s_rel_err": -0.01, "tpot_s_within_noise": True},
        {"id": "c", "status": "ok", "tpot_s_rel_err": 0.50, "tpot_s_within_noise": False}])   # no phases row
    ph = pd.DataFrame([{"id": i, **columns(_rec(0.100, layer=0.080, lm_head=0.020), "measured"),
                        **columns(_rec(0.070, layer=0.050, lm_head=0.020), "predicted")} for i in ("a", "b")])
    lines = P.explain(df, ph, ("tpot_s",))
    assert len(lines) == 1 and lines[0].startswith("a ") and "mostly layer 80.0 -> 50.0 ms" in lines[0]
    assert P.explain(df, pd.DataFrame({"id": []}), ("tpot_s",)) == []


def test_plot_phases_writes_a_png(tmp_path):
    ph = pd.DataFrame([{"id": "a", **columns(_rec(0.100, layer=0.080, lm_head=0.020), "measured"),
                        **columns(_rec(0.070, layer=0.050, lm_head=0.020), "predicted")}])
    out = P.plot_phases(ph, tmp_path / "x.phases.png")
    assert out.exists() and out.stat().st_size > 1000
    assert P.plot_phases(pd.DataFrame({"id": []}), tmp_path / "y.png") is None


def test_phases_csv_path_and_unreadable_file(tmp_path):
    assert P.phases_path(tmp_path / "validation" / "q.csv").name == "q.phases.csv"
    bad = tmp_path / "bad.phases.csv"
    bad.write_bytes(b"\x00\xff garbage")
    assert list(P.load_phases(bad).columns) == ["id"]
    assert len(P.load_phases(tmp_path / "missing.csv")) == 0


def test_every_declared_phase_has_a_colour_slot():
    # the figure stacks PHASES + unaccounted; a phase added to core/phases.py shows up without edits
    assert len(set(PHASES)) == len(PHASES) and "unaccounted" not in PHASES
    assert not math.isnan(stage_record({p: 0.01 for p in PHASES}, 1.0, 1)["step_s"])


def test_tiny_end_to_end_writes_phases_side_by_side_and_halves_carry_them(tmp_path, monkeypatch, capsys):
    """A tiny model's point through both halves: the phases CSV has both sides, each side's
    phases add up to its step; halves=runtime into a fresh CSV (no predictions) still prints;
    halves=simulator carries the measured phase columns over; phases/timeline stay out of
    config_hash."""
    from analysis import validate as V
    from omegaconf import OmegaConf

    def cfg_of(**top):
        cfg = V.compose_config("validate", [f"results_dir={tmp_path}", "progress=false", "figure=false"])
        OmegaConf.update(cfg, "experiment", "t", force_add=True)
        cfg.validation.base = ["model=tiny", "hardware=cpu", "workload.batch=1", "workload.prompt_len=48",
                               "workload.gen_len=6"]
        cfg.validation.points = [{"id": "full", "split": "calibration", "overrides": ["policy=full"],
                                  "runtime": ["warmup=false"]}]
        cfg.overrides = ["hardware.profile=profiles/cpu-intel-r-xeon-r-processor-2c.json"]
        for k, v in top.items():
            OmegaConf.update(cfg, k, v)
        return cfg

    df = V.validate(cfg_of(halves="runtime"))
    assert "predicted_ttft_s" not in df and V.format_points(df).count("nan") == 3   # blanks, no AttributeError
    ph = P.load_phases(P.phases_path(V.csv_path(cfg_of())))
    step = ph.loc[0, "measured_phase_decode_step_s"]
    parts = sum(ph.loc[0, c] for c in ph.columns if c.startswith("measured_phase_decode_")
                and c.removeprefix("measured_phase_decode_").removesuffix("_s") in (*PHASES, "unaccounted"))
    assert parts == pytest.approx(step, rel=1e-6)
    df = V.validate(cfg_of(halves="simulator"))
    ph = P.load_phases(P.phases_path(V.csv_path(cfg_of())))
    assert ph.loc[0, "measured_phase_decode_step_s"] == pytest.approx(step)       # carried over
    pred = sum(ph.loc[0, c] for c in ph.columns if c.startswith("predicted_phase_decode_")
               and c.removeprefix("predicted_phase_decode_").removesuffix("_s") in (*PHASES, "unaccounted"))
    assert pred == pytest.approx(ph.loc[0, "predicted_phase_decode_step_s"], rel=1e-9)
    assert ph.loc[0, "predicted_phase_decode_step_s"] == pytest.approx(df.loc[0, "predicted_tpot_s"], rel=1e-9)
    run_cfg, sim_cfg, _ = V.compose_halves(V.points_of(cfg_of())[0], "t", str(tmp_path))
    h = V.config_hash(run_cfg, sim_cfg)
    run_cfg.timeline = sim_cfg.timeline = True
    run_cfg.phases = False
    assert V.config_hash(run_cfg, sim_cfg) == h


def test_identifiers_stay_text_when_read_back(tmp_path):
    """An all-digit config hash / fingerprint (one in ~900 sha1 prefixes is all digits) read back
    as a number never matched again: resume and halves=simulator refused the point."""
    from analysis import validate as V

    path = tmp_path / "v.csv"
    pd.DataFrame([{"id": "007", "status": "ok", "config_hash": "012345678901", "machine_fingerprint": "123456789012"}]
                 ).to_csv(path, index=False)
    r = V.load(path).iloc[0]
    assert (r.id, r.config_hash, r.machine_fingerprint) == ("007", "012345678901", "123456789012")
