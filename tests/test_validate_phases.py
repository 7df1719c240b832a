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
