"""analysis/validate.py: joining the halves, refusing configs that differ, recording failures."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis import validate as V

TINY = ["model=tiny", "hardware=cpu", "workload.batch=1", "workload.prompt_len=48", "workload.gen_len=6"]


def config(tmp_path, points, base=TINY, **top):
    cfg = V.compose_config("validate", [f"results_dir={tmp_path}", "progress=false"])
    OmegaConf.update(cfg, "experiment", "t", force_add=True)
    cfg.validation.base = base
    cfg.validation.points = points
    for k, v in top.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_rel_err_and_summary_by_hand():
    assert V.rel_err(1.1, 1.0) == pytest.approx(0.1)
    assert V.rel_err(0.8, 1.0) == pytest.approx(-0.2)
    assert math.isnan(V.rel_err(1.0, 0.0)) and math.isnan(V.rel_err(None, 1.0))
    errs = [0.01, -0.02, 0.05, -0.10, 0.20]
    df = pd.DataFrame({"id": list("abcde"), "split": ["heldout"] * 5, "status": ["ok"] * 5,
                       **{f"{m}_rel_err": errs for m in V.HEADLINE}})
    s = V.summary(df).set_index(["split", "metric"]).loc[("heldout", "ttft_s")]
    assert s.points == 5 and s["median"] == pytest.approx(0.05) and s.worst == pytest.approx(0.20)
    assert s.p90 == pytest.approx(pd.Series([0.01, 0.02, 0.05, 0.10, 0.20]).quantile(0.9))
    assert s.worst_point == "e"
    assert V.summary(df).set_index(["split", "metric"]).loc[("calibration", "ttft_s")].points == 0


def test_points_need_id_and_known_split(tmp_path):
    with pytest.raises(V.ConfigError, match="split"):
        V.points_of(config(tmp_path, [{"id": "a", "split": "train", "overrides": []}]))
    with pytest.raises(V.ConfigError, match="twice"):
        V.points_of(config(tmp_path, [{"id": "a", "split": "heldout"}, {"id": "a", "split": "heldout"}]))
    with pytest.raises(V.ConfigError, match="empty"):
        V.points_of(config(tmp_path, []))


def test_every_shipped_experiment_composes_identically_in_both_halves(tmp_path):
    for name in ("validate_quick", "validate_cpu"):
        cfg = V.compose_config("validate", [f"experiment={name}"])
        pts = V.points_of(cfg)
        assert len(pts) >= (24 if name == "validate_cpu" else 5)
        assert {p.split for p in pts} == set(V.SPLITS)
        for p in pts:
            run_cfg, sim_cfg, entry = V.compose_halves(p, name, str(tmp_path))
            assert V.differing_keys(run_cfg, sim_cfg) == [], p.id
            assert entry == ("serve" if sim_cfg.workload.arrival != "static" and sim_cfg.policy.name != "rag" else "bench")


def test_differing_halves_are_refused_with_keys_named_and_failures_recorded(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(V, "measure", lambda entry, cfg: calls.append(cfg) or {})
    pts = [{"id": "differ", "split": "calibration", "overrides": [], "runtime": ["workload.batch=2"]},
           {"id": "too_long", "split": "heldout", "overrides": ["workload.prompt_len=100000"]}]
    df = V.validate(config(tmp_path, pts, figure=False))
    row = df.set_index("id").loc["differ"]
    assert "workload.batch" in row.status and row.status.startswith("ConfigError")
    assert df.set_index("id").loc["too_long"].status != "ok"
    assert all(c.workload.batch == 1 for c in calls)      # the refused point never ran
    assert (tmp_path / "validation" / "t.csv").exists()


def test_end_to_end_on_the_tiny_model_then_resume(tmp_path, monkeypatch):
    pts = [{"id": "full", "split": "calibration", "overrides": ["policy=full"], "runtime": ["warmup=false"]},
           {"id": "kivi", "split": "heldout", "overrides": ["policy=kivi", "policy.group_size=16", "policy.residual=16"],
            "runtime": ["warmup=false"]}]
    cfg = config(tmp_path, pts)
    cfg.overrides = ["hardware.profile=profiles/cpu-intel-r-xeon-r-processor-2c.json"]   # no first-use profiling here
    df = V.validate(cfg)
    assert list(df.status) == ["ok", "ok"], df.status.tolist()
    for m in ("ttft_s", "tpot_s", "throughput_tok_s"):
        assert (df[f"measured_{m}"] > 0).all() and (df[f"predicted_{m}"] > 0).all()
        assert df[f"{m}_rel_err"].tolist() == pytest.approx(
            ((df[f"predicted_{m}"] - df[f"measured_{m}"]) / df[f"measured_{m}"]).tolist())
    # KV bytes are a formula in both halves: they must agree exactly
    assert df.kv_bytes_device_rel_err.abs().max() == pytest.approx(0.0, abs=1e-12)
    assert (tmp_path / "validation" / "t.png").exists()
    # a rerun resumes: nothing is measured again
    monkeypatch.setattr(V, "measure", lambda *a: pytest.fail("resumed point was measured again"))
    again = V.validate(cfg)
    assert again.measured_ttft_s.tolist() == pytest.approx(df.measured_ttft_s.tolist())


def test_extra_overrides_reach_both_halves_and_the_profile_path_is_not_the_config(tmp_path):
    pts = [{"id": "a", "split": "heldout", "overrides": ["policy=full"]}]
    cfg = config(tmp_path, pts)
    cfg.overrides = ["workload.gen_len=5"]
    (p,) = V.points_of(cfg)
    run_cfg, sim_cfg, _ = V.compose_halves(p, "t", str(tmp_path))
    assert run_cfg.workload.gen_len == sim_cfg.workload.gen_len == 5
    h = V.config_hash(run_cfg, sim_cfg)
    sim_cfg.hardware.profile = "/somewhere/else.json"
    assert V.config_hash(run_cfg, sim_cfg) == h
    sim_cfg.workload.gen_len = 6
    assert V.config_hash(run_cfg, sim_cfg) != h


def test_pareto_front_by_hand():
    from analysis.sweep import pareto

    df = pd.DataFrame({"id": list("abcde"), "x": [1, 2, 3, 2, 0], "y": [3, 2, 1, 1, 3], "z": [0, 0, 0, 0, 1]})
    # on (x, y): a, b, c are the front, d is beaten by b, e by a
    assert sorted(pareto(df, "x", "y").id) == ["a", "b", "c"]
    # with z, e (the only z = 1) joins the front
    assert sorted(pareto(df, "x", "y", "z").id) == ["a", "b", "c", "e"]


def test_unknown_experiment_is_one_line_naming_the_options():
    with pytest.raises(V.ConfigError, match="validate_cpu") as e:
        V.compose_config("validate", ["experiment=nope"])
    assert "\n" not in str(e.value) and "experiment=nope: no such option" in str(e.value)
