"""Measured vs predicted, phase by phase (core/phases.py): the per-point phases CSV, the line that
names which phase a missed point's error comes from, and the stacked-bar figure.

    results/validation/<experiment>.phases.csv    one row per point: measured_phase_<stage>_<p>_s,
                                                  predicted_phase_<stage>_<p>_s (p: a phase,
                                                  `unaccounted`, `part_<part>`, `step`)
    results/validation/<experiment>.phases.png    per point, measured beside predicted, stacked

A measured record written before phases existed has none: its columns are simply absent / NaN.
What the phases are and how they are timed: docs/validation.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from core.phases import PARTS, PHASES, STAGES, UNACCOUNTED, columns, phases_csv

from .plots import pyplot, save

# the stage whose step a headline metric is made of (throughput: both, see `stage_of`)
METRIC_STAGE = {"ttft_s": "prefill", "tpot_s": "decode"}
ID_COLUMNS = ("id", "split", "policy")


def phases_path(csv: Path) -> Path:
    """`<experiment>.phases.csv` beside `<experiment>.csv`."""
    return phases_csv(csv)


def measured_phase_columns(records: list[dict]) -> dict[str, float]:
    """The median over a point's repeated measurements of each measured phase column."""
    cols = [columns(r.get("phases"), "measured") for r in records]
    names = sorted({k for c in cols for k in c})
    return {k: float(np.nanmedian([c.get(k, math.nan) for c in cols])) if any(k in c for c in cols) else math.nan
            for k in names}


def predicted_phase_columns(record: dict | None) -> dict[str, float]:
    return columns((record or {}).get("phases"), "predicted")


def load_phases(path: Path) -> pd.DataFrame:
    """A phases CSV, or an empty frame when there is none (or it is unreadable: it is derived
    data, rewritten by the next run)."""
    try:
        df = pd.read_csv(path, dtype={"id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return pd.DataFrame({"id": []})
    return df if "id" in df.columns else pd.DataFrame({"id": []})


def col(stage: str, phase: str, side: str) -> str:
    return f"{side}_phase_{stage}_{phase}_s"


def stage_of(row: pd.Series | dict, metric: str) -> str | None:
    """The stage a metric's error comes from: TTFT the prefill step, TPOT the decode step;
    throughput the stage whose step error, times its steps per request, is larger."""
    if metric in METRIC_STAGE:
        return METRIC_STAGE[metric]
    g = row.get("gen_len")
    g = float(g) if g is not None and np.isfinite(float(g)) else 1.0
    d = {}
    for stage, n in (("prefill", 1.0), ("decode", max(g - 1, 0.0))):
        m, p = row.get(col(stage, "step", "measured")), row.get(col(stage, "step", "predicted"))
        if m is not None and p is not None and np.isfinite(m) and np.isfinite(p):
            d[stage] = abs(p - m) * n
    return max(d, key=d.get) if d else None


def blame(row: pd.Series | dict, stage: str) -> dict | None:
    """The phase of `stage` that accounts for most of the step's error: of predicted minus
    measured per phase (and `unaccounted`, predicted 0), the largest in the direction of the
    step's error. None when either side has no phases."""
    m_step, p_step = row.get(col(stage, "step", "measured")), row.get(col(stage, "step", "predicted"))
    if m_step is None or p_step is None or not (np.isfinite(m_step) and np.isfinite(p_step)):
        return None
    total = p_step - m_step
    sign = 1.0 if total >= 0 else -1.0
    diffs = {}
    for p in (*PHASES, UNACCOUNTED):
        m, q = _val(row, col(stage, p, "measured")), _val(row, col(stage, p, "predicted"))
        if m is None and q is None:
            continue
        diffs[p] = (q or 0.0) - (m or 0.0)
    if not diffs:
        return None
    worst = max(diffs, key=lambda p: sign * diffs[p])
    out = {"stage": stage, "phase": worst, "diff_s": diffs[worst], "step_diff_s": total,
           "measured_s": _val(row, col(stage, worst, "measured")) or 0.0,
           "predicted_s": _val(row, col(stage, worst, "predicted")) or 0.0}
    if worst == "layer":           # and the part of the layer that carries most of it
        pd_ = {}
        for p in PARTS:
            m, q = _val(row, col(stage, f"part_{p}", "measured")), _val(row, col(stage, f"part_{p}", "predicted"))
            if m is not None and q is not None:
                pd_[p] = q - m
        if pd_:
            part = max(pd_, key=lambda p: sign * pd_[p])
            out.update(part=part, part_diff_s=pd_[part])
    return out


def _val(row, key):
    v = row.get(key)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def explain(df: pd.DataFrame, phases: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """One line per (point, metric) off by more than its noise: the phase that accounts for most
    of the error, measured vs predicted per step."""
    if phases is None or not len(phases):
        return []
    by_id = {r["id"]: r for r in phases.to_dict("records")}
    lines = []
    for r in df[df.status == "ok"].to_dict("records"):
        ph = by_id.get(r["id"])
        if ph is None:
            continue
        for m in metrics:
            err = r.get(f"{m}_rel_err")
            within = r.get(f"{m}_within_noise")
            if err is None or not np.isfinite(err) or (isinstance(within, (bool, np.bool_)) and within) or within == "True":
                continue
            stage = stage_of({**r, **ph}, m)
            b = blame(ph, stage) if stage else None
            if b is None:
                continue
            ms = lambda s: f"{1e3 * s:+.1f}"  # noqa: E731
            part = f" (part {b['part']} {ms(b['part_diff_s'])} ms)" if "part" in b else ""
            lines.append(f"{r['id']:<28} {m:<17} {100 * err:+6.1f}%  {stage} step {ms(b['step_diff_s'])} ms: "
                         f"mostly {b['phase']} {1e3 * b['measured_s']:.1f} -> {1e3 * b['predicted_s']:.1f} ms "
                         f"({ms(b['diff_s'])} ms){part}")
    return lines


def plot_phases(phases: pd.DataFrame, out: str | Path) -> Path | None:
    """Per point and stage: the measured step (left bar) beside the predicted one (right bar),
    stacked by phase; ms per step."""
    if phases is None or not len(phases):
        return None
    plt, sns = pyplot()
    stages = [s for s in STAGES if col(s, "step", "measured") in phases or col(s, "step", "predicted") in phases]
    if not stages:
        return None
    names = [*PHASES, UNACCOUNTED]
    colours = dict(zip(names, sns.color_palette("tab20", len(names))))
    ids = list(phases["id"])
    fig, axes = plt.subplots(len(stages), 1, figsize=(max(7, 1.3 * len(ids) + 2), 3.4 * len(stages)), squeeze=False)
    for ax, stage in zip(axes[:, 0], stages):
        x = np.arange(len(ids))
        for dx, side, hatch in ((-0.2, "measured", ""), (0.2, "predicted", "//")):
            bottom = np.zeros(len(ids))
            for p in names:
                c = col(stage, p, side)
                v = (phases[c].fillna(0.0).to_numpy() if c in phases else np.zeros(len(ids))) * 1e3
                if p == UNACCOUNTED:
                    v = np.clip(v, 0, None)          # a negative remainder cannot be stacked
                if not v.any():
                    continue
                ax.bar(x + dx, v, width=0.38, bottom=bottom, color=colours[p], hatch=hatch, edgecolor="white",
                       lw=0.4, label=p if side == "measured" or not (phases.get(col(stage, p, "measured")) is not None) else None)
                bottom += v
        ax.set_xticks(x, ids, rotation=20, ha="right")
        ax.set_ylabel(f"{stage} step, ms")
        ax.set_title(f"{stage}: measured (left) vs predicted (right, hatched)")
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save(fig, out, dpi=110, close=True)
    return Path(out)
