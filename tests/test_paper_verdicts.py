"""The paper experiments' verdicts (analysis/paper.py): ours next to the paper's number, inside its
band or not, and the bound that explains a miss; the figures they draw (readable axes, series
told apart, intervals where the data has them)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from analysis.paper import PAPER, TOLERANCE, band, format_verdicts, verdicts

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "results" / "reference"


def _ref(name: str) -> pd.DataFrame:
    return pd.read_csv(REF / "sweep" / f"{name}.csv")


def test_band_is_a_range_as_published_or_one_number_plus_minus_tolerance():
    assert band((2.17, 3.95)) == (2.17, 3.95)
    assert band(12.0) == pytest.approx((12 * (1 - TOLERANCE), 12 * (1 + TOLERANCE)))
    for paper in PAPER.values():
        assert paper["source"] and set(paper["figures"]) <= set(paper)


def _specache_rows(batch_ratio: float, tput_ratio: float, limit: str) -> pd.DataFrame:
    """A hand-made paper table: full and one SpeCache row at the longest prompt, one shorter."""
    full_b = 10
    rows = [dict(prompt_len=L, policy="full", policy_name="full", max_batch_reached=full_b, batch_vs_full=1.0,
                 throughput_vs_full=1.0, status="ok", batch_limit="device_memory", bound_engine="compute",
                 bound_op="layer", host_kv_per_request_bytes=0, device_kv_per_request_bytes=2e9,
                 kv_available_bytes=2e10) for L in (1024, 4096)]
    rows.append(dict(prompt_len=4096, policy="specache-k16-1b-device", policy_name="specache",
                     max_batch_reached=int(batch_ratio * full_b), batch_vs_full=batch_ratio,
                     throughput_vs_full=tput_ratio, status="ok", batch_limit=limit, bound_engine="compute",
                     bound_op="score", host_kv_per_request_bytes=4e9, device_kv_per_request_bytes=0.3e9,
                     kv_available_bytes=2e10))
    rows.append({**rows[-1], "prompt_len": 1024, "batch_vs_full": 20.0, "throughput_vs_full": 20.0})  # not judged
    return pd.DataFrame(rows)


@pytest.mark.parametrize("batch_ratio,tput_ratio,want", [(8.0, 6.5, ("below", "above")), (11.0, 4.0, ("inside", "inside")),
                                                         (15.0, 3.0, ("above", "below"))])
def test_specache_verdicts_by_hand(batch_ratio, tput_ratio, want):
    v = verdicts(_specache_rows(batch_ratio, tput_ratio, "host_memory"), "specache")
    assert list(v.verdict) == list(want)
    assert list(v.ours) == [batch_ratio, tput_ratio] and list(v.paper) == [12.0, 4.6]
    assert v.lo[0] == pytest.approx(9.6) and v.hi[1] == pytest.approx(5.52)
    n = int(batch_ratio * 10)
    assert v.bound[0] == f"host memory binds: {n} requests x 4.0 GB of 16-bit K/V = {4 * n} GB (hardware.host_memory_bytes)"
    # per-request rate: ours tput / batch against the paper's 4.6 / 12
    assert f"rate {tput_ratio / batch_ratio:.2f} of full's, the paper's implies {4.6 / 12:.2f}" in v.bound[1]


def test_specache_reference_matches_the_documented_verdicts():
    v = verdicts(_ref("paper_specache_a6000"), "specache")
    assert list(v.verdict) == ["below", "above"]
    assert v.ours.round(2).tolist() == [8.43, 6.48]                       # docs/results/papers.md
    assert (v.configuration == "specache-k16-1b-noprefetch-device").all()   # batch ties: the faster one
    assert "host memory binds: 59 requests x 4.3 GB" in v.bound[0]
    assert "compute-bound (largest op: score)" in v.bound[1]


def test_rag_reference_matches_the_documented_verdicts():
    v = verdicts(_ref("paper_speccache_rag"), "rag")
    assert v.configuration.str.endswith("llama32_1b_shape").all()           # the separate draft model's rows
    ttft, tput = v[v.figure.str.startswith("TTFT")], v[v.figure.str.startswith("throughput")]
    assert ttft.ours.round(2).tolist() == [3.58, 3.02, 2.61] and (ttft.verdict == "inside").all()
    assert tput.ours.round(2).tolist() == [2.92, 2.57, 2.29]
    assert tput.verdict.tolist() == ["inside", "below", "below"]
    assert "the ratio stays under the prefill's 3.05x" in tput.bound.iloc[1]
    text = format_verdicts(v, "rag")
    assert PAPER["rag"]["source"] in text and "4 of 6 figures inside the paper's band" in text


def test_no_comparable_rows_is_said_not_crashed():
    df = _specache_rows(8.0, 6.5, "host_memory")
    df = df[df.policy_name != "specache"]
    v = verdicts(df, "specache")
    assert v.empty and "no comparable rows" in format_verdicts(v, "specache")


def test_sweep_prints_the_verdicts_after_a_paper_table(monkeypatch, capsys):
    from analysis import sweep as S

    monkeypatch.setattr(S, "sweep", lambda cfg: _ref("paper_speccache_rag"))
    S.main(["experiment=paper_speccache_rag"])
    out = capsys.readouterr().out
    assert "paper: SpecCache (ACL 2026)" in out and "inside" in out and "below" in out
    assert "4 of 6 figures inside the paper's band" in out


def _data_lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2]       # not the axhline references


def test_specache_figure_tells_every_series_apart():
    from analysis.sweep_plots import plot_paper

    fig = plot_paper(_ref("paper_specache_a6000"), "specache")
    for ax in fig.axes:
        lines = _data_lines(ax)
        styles = {(ln.get_color(), ln.get_linestyle()) for ln in lines}
        assert 0 < len(lines) <= 6 and len(styles) == len(lines), ax.get_title()     # no two alike in a panel
        labels = [t for t in ax.texts if not t.get_text().startswith("paper")]
        assert labels, ax.get_title()                                                # labelled at their ends
        assert "_" not in ax.get_xlabel() + ax.get_ylabel() + ax.get_title()        # no raw column names
    assert fig.axes[-1].get_xlabel() == "prompt length (tokens)"


def test_rag_sweep_figure_carries_the_evals_em_intervals():
    from analysis.sweep_plots import plot_rag, rag_em_intervals

    df = _ref("sweep_k_bits_r")
    e = rag_em_intervals(df[df.rag_em.notna()])
    rag = pd.read_csv(REF / "evals" / "rag" / "rag.csv")
    full = rag[(rag.hops.astype(str) == "all") & (rag.selector == "full")].iloc[0]
    row = e[e.selector == "full"].iloc[0]
    assert (row.rag_em_lo, row.rag_em_hi) == (full.em_lo, full.em_hi)
    d5 = rag[(rag.hops.astype(str) == "all") & (rag.policy == "draft-D5-r0.15")].iloc[0]
    row = e[(e.selector == "draft") & (e.draft_layers == 5) & (e.recompute_ratio == 0.15)].iloc[0]
    assert (row.rag_em_lo, row.rag_em_hi) == (d5.em_lo, d5.em_hi)
    assert e[e.selector.isin(["draft", "cacheblend", "epic", "random"])].rag_em_lo.notna().all()
    fig = plot_rag(df)
    em_ax = fig.axes[1]
    bars = [c for c in em_ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 6                                   # one per selector, each with its intervals
    assert "95%" in em_ax.get_title() and "_" not in em_ax.get_ylabel()
