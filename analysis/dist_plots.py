"""The per-request CDFs of a validation's points with arrivals: measured (every repeat pooled)
against predicted (and, where the point has one, the drift-corrected prediction, dashed), one row
of panels per point, one panel per metric (TTFT, TPOT, the largest inter-token gap, E2E), in
milliseconds. Drawn from `<experiment>.requests.csv`
(analysis/distributions.py), so a notebook can redraw it; `write_outputs` writes that CSV and the
figure beside the validation CSV. How to read them: docs/validation.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.files import write_kept

from .distributions import LABELS, SOURCES, cdf_png, pooled, requests_csv
from .plots import pyplot, save

COLORS = {"measured": "tab:blue", "predicted": "tab:orange", "predicted_corrected": "tab:green"}
STYLES = {"measured": "-", "predicted": "-", "predicted_corrected": "--"}
NAMES = {"measured": "measured", "predicted": "predicted", "predicted_corrected": "predicted, drift-corrected"}


def _ks_note(r: dict, m: str) -> str:
    """"  (KS 0.12)" from the validation row's KS statistic of metric m, "  (KS 0.12, corrected 0.08)"
    where the drift-corrected one is there too; "" when neither is."""
    def val(c):
        v = r.get(c)
        try:
            return float(v) if v is not None and np.isfinite(float(v)) else None
        except (TypeError, ValueError):
            return None
    raw, corr = val(f"dist_{m}_ks"), val(f"dist_{m}_ks_corrected")
    parts = ([f"KS {raw:.2f}"] if raw is not None else []) + ([f"corrected {corr:.2f}"] if corr is not None else [])
    return f"  ({', '.join(parts)})" if parts else ""


def ecdf(x) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, fraction of values <= each): the empirical CDF's steps (NaN left out)."""
    x = np.sort(np.asarray(x, dtype=float)[np.isfinite(np.asarray(x, dtype=float))])
    return x, np.arange(1, len(x) + 1) / max(len(x), 1)


def plot_cdfs(rows: pd.DataFrame, out: str | Path | None, table: pd.DataFrame | None = None):
    """The CDF figure of pooled per-request rows (columns id, half, repeat and the per-request
    columns; half = measured | predicted | predicted_corrected, the last drawn dashed where there);
    `table`: the validation rows, whose KS statistics go into the panels' titles.
    Returns `out` when given, else the figure."""
    plt, _ = pyplot()
    ids = list(dict.fromkeys(rows["id"].astype(str)))
    ks = {} if table is None else {str(r["id"]): r for r in table.to_dict("records")}
    n = len(SOURCES)
    fig, axes = plt.subplots(len(ids), n, figsize=(4.3 * n, 3.5 * len(ids)), squeeze=False)
    for i, pid in enumerate(ids):
        part = rows[rows["id"].astype(str) == pid]
        for ax, (m, src) in zip(axes[i], SOURCES.items()):
            for half in COLORS:
                side = part[part["half"] == half]
                if src not in side or not len(side):
                    continue
                x, y = ecdf(side[src] * 1e3)
                runs = side["repeat"].nunique() if "repeat" in side else 1
                label = f"{NAMES[half]} ({len(x)} req" + (f", {runs} runs)" if half == "measured" else ")")
                ax.step(x, y, where="post", color=COLORS[half], ls=STYLES[half], lw=1.6, label=label)
            extra = _ks_note(ks.get(pid) or {}, m)
            ax.set_title(f"{pid}\n{LABELS[m]}{extra}", fontsize=9)
            ax.set_xlabel("ms")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if ax is axes[i][0]:
                ax.set_ylabel("fraction of requests")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="lower right")
    save(fig, out, close=out is not None)
    return Path(out) if out is not None else fig


def write_outputs(df: pd.DataFrame, path: str | Path, figure: bool = True) -> list[Path]:
    """The pooled per-request CSV and (figure=True) the CDF figure beside the validation CSV at
    `path`, when some point has distributions; returns what was written."""
    rows = pooled(df)
    if not len(rows):
        return []
    out = requests_csv(path)
    write_kept(out, lambda f: rows.to_csv(f, index=False))
    written = [out]
    if figure:
        written.append(plot_cdfs(rows, cdf_png(path), df))
    return written
