"""The numbers behind "within noise": relative error, the interval of a point's repeated
measurements, the spread of the profile tables a prediction reads, and the speed-index drift
that brackets every measurement.

Why a bootstrap interval of the median, and what drift correction does: docs/validation.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from scipy import stats


def rel_err(pred: float, meas: float) -> float:
    if pred is None or meas is None or not np.isfinite(pred) or not np.isfinite(meas) or meas == 0:
        return math.nan
    return (pred - meas) / meas


def interval(samples) -> tuple[float, float, float, str]:
    """(median, lo, hi, kind) of one metric's repeats: a 95% percentile bootstrap interval of the
    median (scipy.stats.bootstrap, seeded) with >= 5 finite samples, else the min-max range."""
    x = np.asarray([v for v in samples if v is not None and np.isfinite(v)], dtype=float)
    if not len(x):
        return math.nan, math.nan, math.nan, ""
    med = float(np.median(x))
    if len(x) >= 5 and np.ptp(x) > 0:
        ci = stats.bootstrap((x,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        return med, float(ci.low), float(ci.high), "bootstrap95"
    return med, float(x.min()), float(x.max()), ("bootstrap95" if len(x) >= 5 else "minmax")


def within_noise(pred: float, lo: float, hi: float, spread: float) -> bool:
    """The prediction inside [lo (1 - spread), hi (1 + spread)]."""
    if None in (pred, lo, hi) or not all(np.isfinite(v) for v in (pred, lo, hi)):
        return False
    s = spread if np.isfinite(spread) else 0.0
    return bool(lo * (1 - s) <= pred <= hi * (1 + s))


def table_spread(t: dict) -> float:
    """Median over a table's points of the relative p10-p90 half-spread (p90 - p10) / (2 p50)."""
    p50, p10, p90 = (np.asarray(t[q], dtype=float).ravel() for q in ("p50", "p10", "p90"))
    keep = p50 > 0
    return float(np.median((p90[keep] - p10[keep]) / (2 * p50[keep]))) if keep.any() else math.nan


def profile_spread(sim_cfg: DictConfig, path: str | Path) -> float:
    """Median of table_spread over the profile tables the point's policy twin reads."""
    from runtime.profile import load as load_profile
    from simulator.policies import make_policy

    prof = load_profile(path)
    kernels = prof["models"].get(sim_cfg.model.name, {}).get("kernels", {})
    spreads = []
    for name in make_policy(sim_cfg.policy).tables():
        t = kernels.get(name) or prof["transfers"].get(name)
        if isinstance(t, dict) and "p50" in t:
            spreads.append(table_spread(t))
    spreads = [v for v in spreads if np.isfinite(v)]
    return float(np.median(spreads)) if spreads else math.nan


# ----------------------------------------------------------------------------- drift

def drift_of(before: float, after: float) -> float:
    return after / before if before and after else math.nan


def drifted(d: float, threshold: float) -> bool:
    return bool(np.isfinite(d) and max(d, 1 / d) > threshold)


def worst_drift(drifts: list[float]) -> float:
    ok = [d for d in drifts if np.isfinite(d)]
    return max(ok, key=lambda d: abs(math.log(d))) if ok else math.nan
