"""A serving replay's iterations: runtime.serve writes what each step ran (core/per_request.py
ITERATION_COLUMNS), analysis/steps.py prices each one as the simulator's serving loop would.
References: the cohort's own cache length step by step, hand-summed profile costs read from the
JSON by index, numpy percentiles."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from analysis.steps import columns, errors, format_steps, iteration_paths, priced, step_columns
from core.per_request import ITERATION_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
GRID = json.loads(CPU.read_text())["models"]["smollm2"]["kernels"]


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def p50(table, **at):
    t, v = GRID[table], GRID[table]["p50"]
    for axis, values in t["axes"].items():
        v = v[values.index(at[axis])]
    return float(v)


def test_serve_writes_each_iteration_it_ran(tmp_path):
    """A static batch of 3 (one cohort, prompts padded to the longest): one prefill of the three
    prompts, then gen_len - 1 decode steps of 3 rows whose context grows by one column a step."""
    from runtime import serve

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = serve.run(_cfg("serve", "model=tiny", "workload.batch=3", "workload.prompt_len=40",
                             "workload.prompt_len_min=20", "workload.gen_len=6", f"results_dir={tmp_path}",
                             "progress=false", "warmup=false"))
    finally:
        torch.set_num_threads(threads)
    df = pd.read_csv(rec["iterations_path"], keep_default_na=False, dtype={"cohorts": str, "prompts": str})
    assert Path(rec["iterations_path"]).name == Path(rec["path"]).stem + ".iterations.csv"
    assert tuple(df.columns) == ITERATION_COLUMNS and len(df) == rec["iterations"]
    prompts = sorted(r["prompt_len"] for r in rec["per_request"])
    assert list(df.stage) == ["prefill"] + ["decode"] * 5
    assert sorted(int(x) for x in df.prompts[0].split()) == prompts and df.rows[0] == 3
    T = max(prompts)
    assert list(df.cohorts[1:]) == [f"3:{T + k}" for k in range(1, 6)]
    assert (df.seconds > 0).all() and df.t_s.is_monotonic_increasing


def test_priced_parses_prompts_and_cohorts():
    df = pd.DataFrame({"stage": ["prefill", "decode", "decode"], "t_s": [0, 1, 2], "seconds": [1, 1, 1],
                       "rows": [2, 1, 3], "cohorts": ["", "1:129", "1:145 2:130"], "prompts": ["128 64", "", ""]})
    calls = []
    out = priced(df, lambda *a: calls.append(a) or float(len(calls)))
    assert list(out) == [1.0, 2.0, 3.0]
    assert calls[0] == ("prefill", [128, 64])
    assert calls[1] == ("decode", 1, 129.0, ((1, 129),))
    assert calls[2] == ("decode", 3, (145 + 2 * 130) / 3, ((1, 145), (2, 130)))


def test_errors_are_percentiles_of_predicted_over_measured():
    rng = np.random.default_rng(0)
    n = 41
    df = pd.DataFrame({"stage": ["decode"] * n + ["prefill"], "seconds": np.r_[rng.uniform(0.02, 0.05, n), 0.2]})
    pred = np.r_[rng.uniform(0.02, 0.05, n), 0.25]
    e = errors(df, pred)
    rel = pred[:n] / df.seconds.to_numpy()[:n] - 1
    assert e["step_err_decode"] == pytest.approx(np.median(rel), rel=1e-12)
    assert (e["step_err_decode_p10"], e["step_err_decode_p90"]) == pytest.approx(tuple(np.percentile(rel, [10, 90])))
    assert e["step_err_prefill"] == pytest.approx(0.25)


def _point(tmp_path, rows):
    req = tmp_path / "run.requests.csv"
    req.write_text("request_id\n")
    pd.DataFrame(rows, columns=ITERATION_COLUMNS).to_csv(tmp_path / "run.iterations.csv", index=False)
    return {"id": "p", "status": "ok", "arrival": "poisson", "measured_requests_paths": json.dumps([str(req)])}


def test_step_columns_price_a_measured_step_as_the_profile_sums_it(tmp_path):
    """One decode step of one row at 512 columns (a grid context, a multiple of the bucket):
    step_overhead(1) + n_layers x decode_layer(1, 512) + lm_head_sample(1), from the JSON; twice
    that at compute scale 2 (every kernel table scaled)."""
    row = _point(tmp_path, [("decode", 0.0, 0.05, 1, "1:512", "")])
    assert iteration_paths(row) == [tmp_path / "run.iterations.csv"]
    cfg = _cfg("simulate", "model=smollm2", f"hardware.profile={CPU}", f"results_dir={tmp_path}")
    out = step_columns(row, cfg, 2.0)
    n_layers = json.loads(CPU.read_text())["models"]["smollm2"]["shape"]["n_layers"]
    hand = p50("step_overhead", batch=1) + n_layers * p50("decode_layer", batch=1, context=512) \
        + p50("lm_head_sample", batch=1)
    assert out["step_iterations"] == 1
    assert out["step_err_decode"] == pytest.approx(hand / 0.05 - 1, rel=1e-9)
    assert out["step_err_decode_corrected"] == pytest.approx(2 * hand / 0.05 - 1, rel=1e-9)
    assert math.isnan(out["step_err_prefill"])
    assert any(line.startswith("p ") or line.startswith("p  ") for line in format_steps(pd.DataFrame([{**row, **out}])))


def test_step_columns_blank_without_iterations(tmp_path):
    """No iterations file (measured before runtime.serve wrote them): blank, silently; one that
    cannot be read: blank and one line; a point without arrivals: blank."""
    cfg = _cfg("simulate", "model=smollm2", f"hardware.profile={CPU}", f"results_dir={tmp_path}")
    lines = []
    row = {"id": "p", "status": "ok", "arrival": "poisson",
           "measured_requests_paths": json.dumps([str(tmp_path / "gone.requests.csv")])}
    out = step_columns(row, cfg, 1.0, warn=lines.append)
    assert all(math.isnan(out[c]) for c in columns()) and not lines
    (tmp_path / "bad.iterations.csv").write_text("stage,t_s\ndecode,0\n")
    row["measured_requests_paths"] = json.dumps([str(tmp_path / "bad.requests.csv")])
    out = step_columns(row, cfg, 1.0, warn=lines.append)
    assert all(math.isnan(out[c]) for c in columns()) and len(lines) == 1 and "iterations" in lines[0]
    assert all(math.isnan(v) for v in step_columns({**row, "arrival": "static"}, cfg, 1.0).values())
