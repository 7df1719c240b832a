"""The repeats of one runtime.bench configuration: each timed run's own metrics, their medians with
an order-statistic confidence interval, and the machine's speed index around them, added to the
pooled record (core/results.py summarize). Why repeats and how to read the interval:
docs/runtime.md ("Repeats and spread").
"""
from __future__ import annotations

import math

import numpy as np

# the metrics each run reports on its own, and that the record gives as median + interval
RUN_METRICS = ("throughput_tok_s", "decode_tok_s", "ttft_s", "tpot_s")
LEVEL = 0.95


def median_ci(values, level: float = LEVEL) -> tuple[float, list[float] | None, float]:
    """(median, [lo, hi], coverage) of the median of `values` (NaN/inf dropped) from order
    statistics: [x_(j), x_(n+1-j)] covers the population median with probability
    P(j <= B <= n - j), B ~ Binomial(n, 1/2), distribution-free (exact, math.comb: no scipy on
    a bare GPU image). j is the largest with coverage
    >= `level`; with too few values for that (n < 6 at 95%) the interval is [min, max] and the
    coverage it really has (n = 3: 0.75). One value: no interval (None, coverage NaN)."""
    x = np.sort(np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float))
    n = len(x)
    if n == 0:
        return math.nan, None, math.nan
    med = float(np.median(x))
    if n == 1:
        return med, None, math.nan
    cover = lambda j: 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0 ** n  # noqa: E731
    j = 1
    while j + 1 <= n // 2 and cover(j + 1) >= level:
        j += 1
    return med, [float(x[j - 1]), float(x[n - j])], cover(j)


def run_metrics(run) -> dict:
    """One timed run's metrics (an engine.BatchResult): tokens/s over its wall time, decode
    tokens/s, the mean TTFT and TPOT of its requests."""
    tpots = [r.tpot_s for r in run.requests if r.tpot_s is not None and not math.isnan(r.tpot_s)]
    return {"throughput_tok_s": run.output_tokens / run.wall_s if run.wall_s > 0 else math.nan,
            "decode_tok_s": run.decode_tokens / run.decode_s if run.decode_s > 0 and run.decode_tokens else math.nan,
            "ttft_s": float(np.mean([r.ttft_s for r in run.requests])) if run.requests else math.nan,
            "tpot_s": float(np.mean(tpots)) if tpots else math.nan,
            "wall_s": run.wall_s}


def repeat_summary(runs, before: dict | None = None, after: dict | None = None) -> dict:
    """The record's repeat fields: `repeats`, `runs` (each run's metrics), `<m>_ci` ([lo, hi] of
    the median over runs; null with one run) and `ci_level` (the interval's coverage), the speed
    index before and after the timed runs with their ratio `speed_drift` (null when not taken).
    `throughput_tok_s` and `decode_tok_s` become the median over runs (the same number with one
    run); TTFT / TPOT keep the schema's pooled mean and percentiles over every run's requests."""
    per = [run_metrics(r) for r in runs]
    out: dict = {"repeats": len(runs), "runs": per}
    level = math.nan
    for m in RUN_METRICS:
        med, ci, level = median_ci([p[m] for p in per])
        if m in ("throughput_tok_s", "decode_tok_s") and math.isfinite(med):
            out[m] = med
        out[f"{m}_ci"] = ci
    out["ci_level"] = None if math.isnan(level) else level
    b = before.get("index") if before else None
    a = after.get("index") if after else None
    out["speed_index_before"], out["speed_index_after"] = b, a
    out["speed_drift"] = a / b if a and b else None
    return out


def spread_rows(r: dict) -> list[tuple[str, str]]:
    """runtime.bench's closing-table rows for the repeats: the throughput median and interval,
    and the speed index around the runs."""
    rows = []
    ci = r.get("throughput_tok_s_ci")
    if r.get("repeats", 1) > 1 and ci:
        runs = ", ".join(f"{p['throughput_tok_s']:.1f}" for p in r["runs"])
        rows.append((f"repeats ({r['repeats']} runs)",
                     f"throughput median {r['throughput_tok_s']:.1f} tok/s, {r['ci_level']:.0%} CI "
                     f"{ci[0]:.1f}-{ci[1]:.1f} (runs: {runs})"))
    if r.get("speed_index_before") and r.get("speed_index_after"):
        rows.append(("speed index before / after",
                     f"{r['speed_index_before']:.1f} / {r['speed_index_after']:.1f} "
                     f"(x{r['speed_drift']:.2f}; beyond ~x1.2 the machine changed speed during the runs)"))
    return rows
