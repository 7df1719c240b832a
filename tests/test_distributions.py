"""analysis/distributions.py and dist_plots.py: per-request distributions of a validation point
with arrivals, against scipy / numpy and hand-computed numbers, on hand-made per-request CSVs;
and through analysis.validate with a fake measurement (no model runs) and the real simulator."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import distributions as D
from analysis.dist_plots import write_outputs
from core.per_request import REQUEST_COLUMNS

RNG = np.random.default_rng(7)


def requests_frame(n: int, scale: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """A per-request table in core/per_request.py's columns, values drawn by hand."""
    g = np.random.default_rng(seed)
    arrival = np.cumsum(g.exponential(0.5, n))
    ttft = scale * g.gamma(2.0, 0.1, n)
    out = g.integers(1, 20, n)
    tpot = np.where(out > 1, scale * g.gamma(3.0, 0.02, n), math.nan)     # one token: no TPOT
    first = arrival + ttft
    done = first + np.nan_to_num(tpot) * (out - 1)
    itl_max = np.where(out > 1, tpot * 1.5, math.nan)
    cols = {"request_id": np.arange(n), "arrival_s": arrival, "admitted_s": arrival + 0.01, "first_token_s": first,
            "done_s": done, "prompt_len": np.full(n, 64), "output_len": out, "queue_s": np.full(n, 0.01),
            "ttft_s": ttft, "tpot_s": tpot, "e2e_s": done - arrival, "itl_mean_s": tpot, "itl_p50_s": tpot,
            "itl_p90_s": tpot, "itl_p99_s": itl_max, "itl_max_s": itl_max, "preemptions": np.zeros(n, int)}
    return pd.DataFrame({c: cols[c] for c in REQUEST_COLUMNS})


def point(tmp_path, sizes=(40, 25), pred_n=50, arrival="poisson", pid="p"):
    """A validation row whose measured repeats and prediction are hand-made CSVs under tmp_path;
    returns (row, measured frames, predicted frame)."""
    meas = [requests_frame(n, 1.0, seed=i) for i, n in enumerate(sizes)]
    paths = []
    for i, df in enumerate(meas):
        p = tmp_path / f"{pid}_m{i}.requests.csv"
        df.to_csv(p, index=False)
        paths.append(str(p))
    pred = requests_frame(pred_n, 1.2, seed=99)
    pp = tmp_path / f"{pid}_sim.requests.csv"
    pred.to_csv(pp, index=False)
    sim = tmp_path / f"{pid}_sim.json"
    sim.write_text(json.dumps({"requests_path": str(pp)}))
    row = {"id": pid, "split": "heldout", "status": "ok", "arrival": arrival, D.PATHS_COLUMN: json.dumps(paths),
           "simulated_path": str(sim), "predicted_ttft_s": 0.3}
    return row, meas, pred


def test_compare_by_hand():
    c = D.compare([1, 2, 3, 4], [2, 3, 4, 5])
    # the CDFs differ by at most 1/4; W1 of a shift by 1 is 1; the measured mean is 2.5
    assert c["ks"] == pytest.approx(0.25) and c["w_rel"] == pytest.approx(1 / 2.5)
    assert c["mean"] == pytest.approx(1 / 2.5) and c["p50"] == pytest.approx((3.5 - 2.5) / 2.5)
    assert c["p90"] == pytest.approx((4.7 - 3.7) / 3.7) and c["p99"] == pytest.approx((4.97 - 3.97) / 3.97)
    same = D.compare([1.0, 2.0, 3.0], [3.0, 1.0, 2.0])
    assert same["ks"] == 0 and same["w_rel"] == 0 and same["ks_p"] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in D.compare([], [1.0]).values())
    assert all(math.isnan(v) for v in D.compare([math.nan], [1.0]).values())


def test_compare_against_scipy_and_numpy():
    x, y = RNG.gamma(2.0, 0.1, 300), RNG.gamma(2.2, 0.1, 170)
    c = D.compare(np.r_[x, math.nan], y)             # NaN (a one-token request's TPOT) left out
    ks = stats.ks_2samp(x, y)
    assert c["ks"] == pytest.approx(ks.statistic) and c["ks_p"] == pytest.approx(ks.pvalue)
    assert c["w_rel"] == pytest.approx(stats.wasserstein_distance(x, y) / x.mean())
    assert c["mean"] == pytest.approx((y.mean() - x.mean()) / x.mean())
    for q in (50, 90, 99):
        assert c[f"p{q}"] == pytest.approx((np.percentile(y, q) - np.percentile(x, q)) / np.percentile(x, q))


def test_columns_pool_every_repeat(tmp_path):
    row, meas, pred = point(tmp_path)
    got = D.distribution_columns(row, warn=pytest.fail)
    assert set(got) == set(D.columns())
    pooled = pd.concat(meas)
    assert got["dist_requests_measured"] == 65 and got["dist_requests_predicted"] == 50
    for m, src in D.SOURCES.items():
        x, y = pooled[src].dropna().to_numpy(), pred[src].dropna().to_numpy()
        assert got[f"dist_{m}_ks"] == pytest.approx(stats.ks_2samp(x, y).statistic)
        assert got[f"dist_{m}_w_rel"] == pytest.approx(stats.wasserstein_distance(x, y) / x.mean())
        for q in (50, 90, 99):
            px, py = np.percentile(x, q), np.percentile(y, q)
            assert got[f"err_{m}_p{q}"] == pytest.approx((py - px) / px)
        assert got[f"err_{m}_mean"] == pytest.approx((y.mean() - x.mean()) / x.mean())
    # pooling is not averaging the repeats' statistics: the first repeat alone gives another p90
    alone = np.percentile(meas[0].ttft_s, 90)
    assert np.percentile(pooled.ttft_s, 90) != pytest.approx(alone)
    lines = D.format_distributions(pd.DataFrame([{**row, **got}]))
    assert len(lines) == 2 and lines[1].startswith("p ") and "KS" in lines[1] and "ttft" in lines[1]


def test_points_without_arrivals_or_prediction_are_blank(tmp_path):
    row, _, _ = point(tmp_path)
    for other in ({**row, "arrival": "static"}, {**row, "arrival": "closed"}, {**row, "status": "ConfigError: x"},
                  {**row, "simulated_path": math.nan}):
        got = D.distribution_columns(other, warn=pytest.fail)
        assert set(got) == set(D.columns()) and all(math.isnan(v) for v in got.values())
    assert D.requests_columns({"arrival": "static"}, [{"path": "x.json"}]) == {}
    assert json.loads(D.requests_columns({"arrival": "gamma"}, [{"path": "a/r1.json"}, {"path": "a/r2.json"}])
                      [D.PATHS_COLUMN]) == ["a/r1.requests.csv", "a/r2.requests.csv"]
    assert D.format_distributions(pd.DataFrame([{**row, "arrival": "static", **D.distribution_columns(
        {**row, "arrival": "static"})}])) == []


@pytest.mark.parametrize("damage", ["gone", "not_csv", "no_column", "sim_gone", "no_paths"])
def test_unreadable_requests_file_is_one_warning_and_blank_columns(tmp_path, damage):
    row, _, _ = point(tmp_path)
    first = json.loads(row[D.PATHS_COLUMN])[0]
    if damage == "gone":
        (tmp_path / "p_m0.requests.csv").unlink()
    elif damage == "not_csv":
        (tmp_path / "p_m0.requests.csv").write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "no_column":
        pd.DataFrame({"request_id": [1]}).to_csv(first, index=False)
    elif damage == "sim_gone":
        (tmp_path / "p_sim.json").unlink()
    else:
        row[D.PATHS_COLUMN] = math.nan
    lines = []
    got = D.distribution_columns(row, warn=lines.append)
    assert all(math.isnan(v) for v in got.values())
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("analysis.validate: p: ")
    assert "left blank" in lines[0]
    if damage in ("gone", "no_column"):
        assert "p_m0.requests.csv" in lines[0]


def test_pooled_csv_and_figure_written(tmp_path):
    a, meas, pred = point(tmp_path, pid="a")
    b, _, _ = point(tmp_path, sizes=(10,), pred_n=12, pid="b")
    c = {**a, "id": "c", "arrival": "static"}
    gone, _, _ = point(tmp_path, pid="gone")
    (tmp_path / "gone_sim.requests.csv").unlink()
    df = pd.DataFrame([{**r, **D.distribution_columns(r, warn=lambda _: None)} for r in (a, b, c, gone)])
    out = tmp_path / "validation" / "t.csv"
    out.parent.mkdir()
    written = write_outputs(df, out)
    assert written == [out.with_name("t.requests.csv"), out.with_name("t.cdf.png")]
    rows = pd.read_csv(written[0])
    assert list(rows.columns) == list(D.POOLED_COLUMNS)
    assert rows.groupby(["id", "half"]).size().to_dict() == {("a", "measured"): 65, ("a", "predicted"): 50,
                                                             ("b", "measured"): 10, ("b", "predicted"): 12}
    assert sorted(rows[(rows.id == "a") & (rows.half == "measured")].repeat.unique()) == [0, 1]
    assert rows[(rows.id == "a") & (rows.half == "predicted")].ttft_s.tolist() == pytest.approx(pred.ttft_s.tolist())
    png = written[1].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # nothing to pool: nothing written
    assert write_outputs(df[df.id == "c"], tmp_path / "validation" / "u.csv") == []
    assert not (tmp_path / "validation" / "u.requests.csv").exists()


def test_ecdf_steps():
    from analysis.dist_plots import ecdf

    x, y = ecdf([3.0, 1.0, math.nan, 2.0])
    assert x.tolist() == [1.0, 2.0, 3.0] and y.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_through_validate_with_a_fake_measurement(tmp_path, monkeypatch, capsys):
    """A Poisson point through analysis.validate: the runtime half faked (hand-made per-request CSVs,
    one per repeat), the simulator half real on the tiny model; then the measured file of one repeat
    vanishes and halves=simulator re-predicts: blank columns, one warning, the rest of the row kept."""
    import runtime.profile.speed as speed
    from analysis import validate as V

    monkeypatch.setattr(speed, "speed_index", lambda *a, **k: {"index": 1.0})
    made = []

    def fake_measure(entry, cfg):
        assert entry == "serve"
        i = len(made)
        res = tmp_path / "measured" / f"fake_{i}.json"
        res.parent.mkdir(exist_ok=True)
        requests_frame(10 + i, 1.0, seed=i).to_csv(res.with_name(f"fake_{i}.requests.csv"), index=False)
        made.append(res)
        return {"path": str(res), "ttft_s": 0.1, "tpot_s": 0.02, "throughput_tok_s": 50.0}

    monkeypatch.setattr(V, "measure", fake_measure)
    cfg = V.compose_config("validate", [f"results_dir={tmp_path}", "progress=false"])
    cfg.experiment = "t"
    cfg.validation.repeats = 2
    cfg.validation.base = ["model=tiny", "hardware=cpu", "workload.prompt_len=32", "workload.gen_len=4"]
    cfg.validation.points = [
        {"id": "pois", "split": "heldout", "overrides": ["policy=full", "workload=poisson", "workload.rate=4",
                                                         "workload.n_requests=12", "workload.prompt_len=32",
                                                         "workload.gen_len=4"]}]
    cfg.overrides = ["hardware.profile=profiles/cpu-intel-r-xeon-r-processor-2c.json"]
    df = V.validate(cfg)
    row = df.set_index("id").loc["pois"]
    assert row.status == "ok" and len(made) == 2
    assert row.dist_requests_measured == 21 and row.dist_requests_predicted == 12
    sim = json.loads(open(row.simulated_path).read())
    pred = pd.read_csv(sim["requests_path"])
    x = pd.concat([pd.read_csv(p.with_name(f"{p.stem}.requests.csv")) for p in made]).ttft_s
    assert row.dist_ttft_ks == pytest.approx(stats.ks_2samp(x, pred.ttft_s).statistic)
    assert row.err_e2e_p99 == pytest.approx(D.compare(
        pd.concat([pd.read_csv(p.with_name(f"{p.stem}.requests.csv")) for p in made]).e2e_s, pred.e2e_s)["p99"])
    out = tmp_path / "validation"
    assert (out / "t.requests.csv").exists() and (out / "t.cdf.png").exists()
    # the drift-corrected prediction (the model probe on the tiny model gives a compute scale):
    # its own columns, and a second summary line
    assert row.drift_source == "model_probe" and isinstance(row.get(D.CORRECTED_COLUMN), str)
    corr = pd.read_csv(json.loads(open(row[D.CORRECTED_COLUMN]).read())["requests_path"])
    assert row.dist_ttft_ks_corrected == pytest.approx(stats.ks_2samp(x, corr.ttft_s).statistic)
    assert row.dist_requests_predicted_corrected == len(corr)
    assert len(D.format_distributions(df)) == 3

    capsys.readouterr()
    made[0].with_name("fake_0.requests.csv").unlink()
    cfg.halves = "simulator"
    again = V.validate(cfg).set_index("id").loc["pois"]
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "left blank" in ln]
    assert len(warned) == 1 and "fake_0.requests.csv" in warned[0]
    assert again.status == "ok" and math.isnan(again.dist_ttft_ks) and math.isnan(again.err_ttft_p90)
    assert again.predicted_ttft_s == pytest.approx(row.predicted_ttft_s)
    assert again.measured_ttft_s == pytest.approx(row.measured_ttft_s)


def test_validate_serve_composes_as_a_poisson_serve_point(tmp_path):
    from analysis import validate as V

    cfg = V.compose_config("validate", ["experiment=validate_serve"])
    assert cfg.validation.repeats >= 2
    pts = V.points_of(cfg)
    assert pts
    for p in pts:
        run_cfg, sim_cfg, entry = V.compose_halves(p, "validate_serve", str(tmp_path))
        assert entry == "serve" and V.differing_keys(run_cfg, sim_cfg) == []
        assert sim_cfg.workload.arrival == "poisson" and sim_cfg.workload.n_requests >= 100
        assert run_cfg.scheduler.max_batch == sim_cfg.scheduler.max_batch
        assert D.has_arrivals(V.describe(sim_cfg))
