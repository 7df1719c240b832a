"""runtime.bench's repeats: the order-statistic interval of the median (against scipy's binomial
and a Monte Carlo check of its coverage), the record's repeat fields on a real smoke run, and
analysis.validate pinning one run per call without changing any committed config hash."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from runtime.repeats import median_ci, repeat_summary, spread_rows


@pytest.mark.parametrize("n", range(2, 16))
def test_median_ci_is_the_tightest_order_statistic_interval_with_95_percent(n):
    x = np.random.default_rng(n).lognormal(size=n)
    med, (lo, hi), level = median_ci(x)
    xs = np.sort(x)
    cover = lambda j: 1 - 2 * stats.binom.cdf(j - 1, n, 0.5)  # noqa: E731
    js = [j for j in range(1, n // 2 + 1) if cover(j) >= 0.95]
    j = max(js) if js else 1                           # too few for 95%: [min, max] at its own level
    assert med == pytest.approx(np.median(x))
    assert (lo, hi) == (xs[j - 1], xs[n - j]) and level == pytest.approx(cover(j), abs=1e-12)


def test_median_ci_hand_values():
    assert median_ci([3.0, 1.0, 2.0]) == (2.0, [1.0, 3.0], 0.75)            # 1 - 2 / 2^3
    assert median_ci(range(9))[1:] == ([1.0, 7.0], 1 - 2 * 10 / 512)       # j = 2: 1 - 2 (1 + 9) / 2^9
    med, ci, level = median_ci([5.0])                                      # one run: no interval
    assert med == 5.0 and ci is None and math.isnan(level)
    med, ci, level = median_ci([1.0, float("nan"), float("inf"), 3.0])     # NaN / inf dropped
    assert med == 2.0 and ci == [1.0, 3.0] and level == 0.5
    assert math.isnan(median_ci([])[0])


def test_median_ci_covers_the_median_as_often_as_it_says():
    rng = np.random.default_rng(0)
    n, trials = 9, 4000
    true_median = np.log(2)                                     # Exp(1)
    hits = 0
    for _ in range(trials):
        _, (lo, hi), level = median_ci(rng.exponential(size=n))
        hits += lo <= true_median <= hi
    assert abs(hits / trials - level) < 0.02, (hits / trials, level)


def _run(tput_wall, ttfts, tpot, decode_s):
    reqs = [SimpleNamespace(ttft_s=t, tpot_s=tpot, tokens=[0] * 4) for t in ttfts]
    return SimpleNamespace(requests=reqs, output_tokens=4 * len(reqs), wall_s=tput_wall, decode_tokens=3 * len(reqs),
                           decode_s=decode_s)


def test_repeat_summary_by_hand():
    runs = [_run(1.0, [0.1, 0.3], 0.01, 0.5), _run(2.0, [0.2, 0.2], 0.03, 1.0), _run(4.0, [0.5, 0.7], 0.02, 2.0)]
    s = repeat_summary(runs, {"index": 100.0}, {"index": 80.0})
    assert s["repeats"] == 3 and [r["throughput_tok_s"] for r in s["runs"]] == [8.0, 4.0, 2.0]
    assert s["throughput_tok_s"] == 4.0 and s["throughput_tok_s_ci"] == [2.0, 8.0] and s["ci_level"] == 0.75
    assert s["decode_tok_s"] == 6.0 and s["decode_tok_s_ci"] == [3.0, 12.0]
    assert s["ttft_s_ci"] == pytest.approx([0.2, 0.6]) and s["tpot_s_ci"] == [0.01, 0.03]
    assert s["speed_index_before"] == 100.0 and s["speed_index_after"] == 80.0 and s["speed_drift"] == 0.8
    one = repeat_summary(runs[:1])
    assert one["throughput_tok_s_ci"] is None and one["ci_level"] is None and one["speed_drift"] is None
    rows = dict(spread_rows({**s, "repeats": 3}))
    assert "75% CI 2.0-8.0" in rows["repeats (3 runs)"] and "x0.80" in rows["speed index before / after"]


def _bench_cfg(tmp_path, *over):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from core.config import register

    register()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose(config_name="bench", overrides=["experiment=smoke", "progress=false",
                                                       f"results_dir={tmp_path}", *over])


def test_bench_repeats_by_default_and_reports_median_interval_and_speed(tmp_path):
    from runtime import bench

    r = bench.run(_bench_cfg(tmp_path))
    data = json.loads(open(r["path"]).read())
    assert data["repeats"] == 3 and len(data["runs"]) == 3
    per = [p["throughput_tok_s"] for p in data["runs"]]
    assert data["throughput_tok_s"] == pytest.approx(np.median(per))
    assert data["throughput_tok_s_ci"] == [min(per), max(per)] and data["ci_level"] == 0.75
    assert data["speed_index_before"] > 0 and data["speed_index_after"] > 0
    assert data["speed_drift"] == pytest.approx(data["speed_index_after"] / data["speed_index_before"])
    assert data["requests"] == 3 * 2                                  # TTFT / TPOT pool every run's requests
    assert "repeats (3 runs)" in bench.format_table(r)
    one = bench.run(_bench_cfg(tmp_path, "repeats=1", "speed_index=false"))
    assert one["repeats"] == 1 and one["throughput_tok_s_ci"] is None and one["speed_index_before"] is None
    assert one["throughput_tok_s"] == pytest.approx(one["runs"][0]["throughput_tok_s"])


def test_validate_pins_one_run_per_call_and_keeps_the_committed_hashes():
    from pathlib import Path

    from analysis import validate as V
    from analysis.compose import points_of
    from analysis.halves import prepare

    ref = pd.read_csv(Path(__file__).resolve().parents[1] / "results/reference/validation/validate_quick_reference.csv")
    cfg = V.compose_config("validate", ["experiment=validate_quick"])
    jobs = [prepare(p, cfg) for p in points_of(cfg)]
    benches = [j for j in jobs if j.entry == "bench"]
    assert benches and all(j.run_cfg.repeats == 1 and j.run_cfg.speed_index is False for j in benches)
    hashes = dict(zip(ref.id, ref.config_hash))
    assert [j.row["config_hash"] for j in jobs] == [hashes[j.p.id] for j in jobs]     # committed CSVs still resume
