"""analysis/distributions.py and dist_plots.py against the drift-corrected prediction
(`simulated_corrected_path`): the `_corrected` columns, the pooled rows with half =
predicted_corrected, the printed line and the dashed CDF, on hand-made per-request CSVs and result
JSONs, checked against scipy and hand-computed errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import distributions as D
from analysis.dist_plots import plot_cdfs, write_outputs
from tests.test_distributions import point, requests_frame

RAW = ["dist_requests_measured", "dist_requests_predicted"] + [
    c for m in ("ttft", "tpot", "itl_max", "e2e")
    for c in (f"dist_{m}_ks", f"dist_{m}_ks_p", f"dist_{m}_w_rel", f"err_{m}_mean", f"err_{m}_p50",
              f"err_{m}_p90", f"err_{m}_p99")]


def with_corrected(tmp_path, row, n=45, scale=1.05, pid="p"):
    """The row with a drift-corrected prediction: its own per-request CSV and result JSON."""
    pred = requests_frame(n, scale, seed=123)
    csv = tmp_path / f"{pid}_simc.requests.csv"
    pred.to_csv(csv, index=False)
    sim = tmp_path / f"{pid}_simc.json"
    sim.write_text(json.dumps({"requests_path": str(csv), "ttft_s": 0.2}))
    return {**row, D.CORRECTED_COLUMN: str(sim)}, pred


def test_columns_raw_first_then_corrected():
    cols = D.columns()
    assert cols[:len(RAW)] == RAW                      # the raw columns as they were, in their order
    corr = cols[len(RAW):]
    assert corr == [c + "_corrected" for c in RAW if c != "dist_requests_measured"]
    for c in ("dist_ttft_ks_corrected", "dist_ttft_ks_p_corrected", "dist_itl_max_w_rel_corrected",
              "err_e2e_p99_corrected", "err_tpot_mean_corrected", "dist_requests_predicted_corrected"):
        assert c in corr
    assert "dist_requests_measured_corrected" not in cols and len(set(cols)) == len(cols)


def test_same_file_gives_the_raw_numbers(tmp_path):
    row, _, _ = point(tmp_path)
    got = D.distribution_columns({**row, D.CORRECTED_COLUMN: row["simulated_path"]}, warn=pytest.fail)
    raw = D.distribution_columns(row, warn=pytest.fail)
    assert set(got) == set(D.columns())
    for c in D.corrected_columns():
        assert got[c] == pytest.approx(raw[c[:-len("_corrected")]], nan_ok=False)
    assert {c: got[c] for c in RAW} == pytest.approx({c: raw[c] for c in RAW})


def test_corrected_columns_against_scipy_and_by_hand(tmp_path):
    row, meas, _ = point(tmp_path)
    row, corr = with_corrected(tmp_path, row)
    got = D.distribution_columns(row, warn=pytest.fail)
    pooled = pd.concat(meas)
    assert got["dist_requests_predicted_corrected"] == 45 and got["dist_requests_measured"] == 65
    for m, src in D.SOURCES.items():
        x, y = pooled[src].dropna().to_numpy(), corr[src].dropna().to_numpy()
        ks = stats.ks_2samp(x, y)
        assert got[f"dist_{m}_ks_corrected"] == pytest.approx(ks.statistic)
        assert got[f"dist_{m}_ks_p_corrected"] == pytest.approx(ks.pvalue)
        assert got[f"dist_{m}_w_rel_corrected"] == pytest.approx(stats.wasserstein_distance(x, y) / x.mean())
        mx, my = x.sum() / len(x), y.sum() / len(y)
        assert got[f"err_{m}_mean_corrected"] == pytest.approx((my - mx) / mx)
        for q in (50, 90, 99):
            px, py = np.percentile(x, q), np.percentile(y, q)
            assert got[f"err_{m}_p{q}_corrected"] == pytest.approx((py - px) / px)
    # the raw columns do not move when the corrected prediction is there
    raw = D.distribution_columns({k: v for k, v in row.items() if k != D.CORRECTED_COLUMN}, warn=pytest.fail)
    assert {c: got[c] for c in RAW} == pytest.approx({c: raw[c] for c in RAW})
    assert got["dist_ttft_ks_corrected"] != pytest.approx(got["dist_ttft_ks"])


def test_ttft_mean_error_by_hand(tmp_path):
    """Tiny CSVs whose numbers are checked without numpy: measured TTFT 1, 2, 3 (mean 2), the
    corrected prediction 2, 2, 2, 2 (mean 2: error 0) and the raw one 3, 3 (error +50%)."""
    def csv(name, ttft):
        df = requests_frame(len(ttft), seed=5)
        df["ttft_s"] = ttft
        df.to_csv(tmp_path / f"{name}.requests.csv", index=False)
        (tmp_path / f"{name}.json").write_text(json.dumps({"requests_path": str(tmp_path / f"{name}.requests.csv")}))
        return str(tmp_path / f"{name}.json")

    m = csv("m", [1.0, 2.0, 3.0])
    row = {"id": "h", "status": "ok", "arrival": "gamma", D.PATHS_COLUMN: json.dumps([m[:-5] + ".requests.csv"]),
           "simulated_path": csv("raw", [3.0, 3.0]), D.CORRECTED_COLUMN: csv("corr", [2.0, 2.0, 2.0, 2.0])}
    got = D.distribution_columns(row, warn=pytest.fail)
    assert got["err_ttft_mean"] == pytest.approx(0.5) and got["err_ttft_mean_corrected"] == pytest.approx(0.0)
    assert got["err_ttft_p50_corrected"] == pytest.approx(0.0) and got["err_ttft_p50"] == pytest.approx(0.5)
    # KS: the measured CDF is 1/3 on [1, 2), 2/3 on [2, 3); the corrected one jumps 0 -> 1 at 2 (gap 1/3
    # either side), the raw one 0 -> 1 at 3 (gap 2/3 on [2, 3))
    assert got["dist_ttft_ks_corrected"] == pytest.approx(1 / 3) and got["dist_ttft_ks"] == pytest.approx(2 / 3)
    assert got["dist_requests_predicted"] == 2 and got["dist_requests_predicted_corrected"] == 4


@pytest.mark.parametrize("damage", ["json_gone", "csv_gone", "no_requests_path", "not_json"])
def test_unreadable_corrected_file_is_one_warning(tmp_path, damage):
    row, _, _ = point(tmp_path)
    row, _ = with_corrected(tmp_path, row)
    if damage == "json_gone":
        (tmp_path / "p_simc.json").unlink()
    elif damage == "csv_gone":
        (tmp_path / "p_simc.requests.csv").unlink()
    elif damage == "no_requests_path":
        (tmp_path / "p_simc.json").write_text(json.dumps({"ttft_s": 0.2}))
    else:
        (tmp_path / "p_simc.json").write_text("{not json")
    lines = []
    got = D.distribution_columns(row, warn=lines.append)
    assert all(math.isnan(got[c]) for c in D.corrected_columns())
    assert got == pytest.approx({**D.distribution_columns({**row, D.CORRECTED_COLUMN: math.nan}, warn=pytest.fail),
                                 **dict.fromkeys(D.corrected_columns(), math.nan)}, nan_ok=True)
    assert all(np.isfinite(got[c]) for c in RAW)
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("analysis.validate: p: ")
    assert "drift-corrected distribution columns are left blank" in lines[0]
    assert ("p_simc.requests.csv" if damage == "csv_gone" else "p_simc.json") in lines[0]


@pytest.mark.parametrize("value", ["absent", math.nan, "", None])
def test_no_corrected_path_leaves_the_columns_blank_silently(tmp_path, value):
    row, _, _ = point(tmp_path)
    if value != "absent":
        row = {**row, D.CORRECTED_COLUMN: value}
    got = D.distribution_columns(row, warn=pytest.fail)
    assert set(got) == set(D.columns())
    assert all(math.isnan(got[c]) for c in D.corrected_columns())
    assert all(np.isfinite(got[c]) for c in RAW)


def test_measured_gone_is_one_warning_for_both(tmp_path):
    row, _, _ = point(tmp_path)
    row, _ = with_corrected(tmp_path, row)
    (tmp_path / "p_m1.requests.csv").unlink()
    lines = []
    got = D.distribution_columns(row, warn=lines.append)
    assert all(math.isnan(v) for v in got.values())
    assert len(lines) == 1 and "p_m1.requests.csv" in lines[0] and "drift-corrected" not in lines[0]


def test_raw_gone_keeps_the_corrected_columns(tmp_path):
    row, meas, _ = point(tmp_path)
    row, corr = with_corrected(tmp_path, row)
    (tmp_path / "p_sim.requests.csv").unlink()
    lines = []
    got = D.distribution_columns(row, warn=lines.append)
    assert len(lines) == 1 and "p_sim.requests.csv" in lines[0] and "drift-corrected" not in lines[0]
    assert all(math.isnan(got[c]) for c in RAW)
    x = pd.concat(meas).ttft_s.to_numpy()
    assert got["dist_ttft_ks_corrected"] == pytest.approx(stats.ks_2samp(x, corr.ttft_s.to_numpy()).statistic)


def test_not_ok_or_without_arrivals_is_blank(tmp_path):
    row, _, _ = point(tmp_path)
    row, _ = with_corrected(tmp_path, row)
    for other in ({**row, "arrival": "static"}, {**row, "status": "ConfigError: x"}):
        assert all(math.isnan(v) for v in D.distribution_columns(other, warn=pytest.fail).values())


def test_format_puts_the_corrected_line_after_the_raw_one(tmp_path):
    a, _, _ = point(tmp_path, pid="a")
    a, _ = with_corrected(tmp_path, a, pid="a")
    b, _, _ = point(tmp_path, pid="b")                      # no corrected prediction
    df = pd.DataFrame([{**r, **D.distribution_columns(r, warn=pytest.fail)} for r in (a, b)])
    lines = D.format_distributions(df)
    assert len(lines) == 4 and "drift-corrected" in lines[0]
    assert lines[1].startswith("a ") and lines[2].startswith("a (drift-corrected) ") and lines[3].startswith("b ")
    r = df.iloc[0]
    for m in D.SOURCES:
        errs = "/".join(f"{100 * r[f'err_{m}_{s}_corrected']:+.1f}%" for s in D.STATS)
        assert f"{m} {errs} KS {r[f'dist_{m}_ks_corrected']:.2f}" in lines[2]
        raw = "/".join(f"{100 * r[f'err_{m}_{s}']:+.1f}%" for s in D.STATS)
        assert f"{m} {raw} KS {r[f'dist_{m}_ks']:.2f}" in lines[1]
    # the raw line alone keeps the old header and one line per point
    only = D.format_distributions(df[df.id == "b"])
    assert len(only) == 2 and "drift-corrected" not in "".join(only)
    # from a CSV written before the corrected columns existed
    old = df.drop(columns=D.corrected_columns())
    assert [ln for ln in D.format_distributions(old) if "drift-corrected" in ln] == []


def test_pooled_rows_and_figure(tmp_path):
    a, meas, pred = point(tmp_path, pid="a")
    a, corr = with_corrected(tmp_path, a, pid="a")
    b, _, _ = point(tmp_path, sizes=(10,), pred_n=12, pid="b")
    gone, _, _ = point(tmp_path, pid="gone")
    gone, _ = with_corrected(tmp_path, gone, pid="gone")
    (tmp_path / "gone_simc.requests.csv").unlink()
    df = pd.DataFrame([{**r, **D.distribution_columns(r, warn=lambda _: None)} for r in (a, b, gone)])
    rows = D.pooled(df)
    assert list(rows.columns) == list(D.POOLED_COLUMNS)
    assert rows.groupby(["id", "half"]).size().to_dict() == {
        ("a", "measured"): 65, ("a", "predicted"): 50, ("a", "predicted_corrected"): 45,
        ("b", "measured"): 10, ("b", "predicted"): 12, ("gone", "measured"): 65, ("gone", "predicted"): 50}
    side = rows[(rows.id == "a") & (rows.half == "predicted_corrected")]
    assert side.ttft_s.tolist() == pytest.approx(corr.ttft_s.tolist()) and set(side.repeat) == {0}
    assert rows[(rows.id == "a") & (rows.half == "predicted")].ttft_s.tolist() == pytest.approx(pred.ttft_s.tolist())

    out = tmp_path / "v" / "t.csv"
    out.parent.mkdir()
    written = write_outputs(df, out)
    assert written == [out.with_name("t.requests.csv"), out.with_name("t.cdf.png")]
    assert set(pd.read_csv(written[0]).half) == {"measured", "predicted", "predicted_corrected"}
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cdf_draws_the_corrected_prediction_dashed(tmp_path):
    import matplotlib.pyplot as plt

    a, _, _ = point(tmp_path, pid="a")
    a, _ = with_corrected(tmp_path, a, pid="a")
    b, _, _ = point(tmp_path, sizes=(10,), pred_n=12, pid="b")
    df = pd.DataFrame([{**r, **D.distribution_columns(r, warn=pytest.fail)} for r in (a, b)])
    rows = D.pooled(df)
    fig = plot_cdfs(rows, None, df)

    def n(pid, half, src):          # the requests a curve draws: those with a value (one token: no TPOT)
        return int(rows[(rows.id == pid) & (rows.half == half)][src].notna().sum())

    try:
        axes = np.asarray(fig.axes).reshape(2, len(D.SOURCES))
        for ax, (m, src) in zip(axes[0], D.SOURCES.items()):
            lines = ax.get_lines()
            corrected = f"predicted, drift-corrected ({n('a', 'predicted_corrected', src)} req)"
            assert [ln.get_label() for ln in lines] == [f"measured ({n('a', 'measured', src)} req, 2 runs)",
                                                       f"predicted ({n('a', 'predicted', src)} req)", corrected]
            assert [ln.get_linestyle() for ln in lines] == ["-", "-", "--"]
            assert lines[2].get_color() != lines[1].get_color()
            ks, kc = df.iloc[0][f"dist_{m}_ks"], df.iloc[0][f"dist_{m}_ks_corrected"]
            assert ax.get_title().endswith(f"(KS {ks:.2f}, corrected {kc:.2f})")
            assert [t.get_text() for t in ax.get_legend().get_texts()][2] == corrected
        assert n("a", "predicted_corrected", "ttft_s") == 45
        for ax, (m, src) in zip(axes[1], D.SOURCES.items()):     # no corrected prediction: as before
            assert [ln.get_label() for ln in ax.get_lines()] == [f"measured ({n('b', 'measured', src)} req, 1 runs)",
                                                                f"predicted ({n('b', 'predicted', src)} req)"]
            assert ax.get_title().endswith(f"(KS {df.iloc[1][f'dist_{m}_ks']:.2f})")
    finally:
        plt.close(fig)
