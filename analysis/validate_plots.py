"""The validation figures, drawn from a validation CSV (analysis/table.py `load`): predicted vs
measured per headline metric, the signed error per point, and what each half cost in wall time.
analysis.validate writes the first beside the CSV; analysis/validate.ipynb draws all three.
How to read them: docs/validation.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .plots import plain_log_ticks, pyplot, save
from .table import HEADLINE, SPLITS

UNITS = {"throughput_tok_s": ("tok/s", 1), "ttft_s": ("ms", 1e3), "tpot_s": ("ms", 1e3)}


def plot_fidelity(df: pd.DataFrame, out: str | Path) -> Path:
    """Predicted vs measured (log-log, y = x and +-10 % bands), one panel per headline metric."""
    plt, sns = pyplot()
    ok = df[df.status == "ok"]
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 4.6))
    for ax, m in zip(axes, HEADLINE):
        unit, k = UNITS[m]
        d = ok.assign(measured=ok[f"measured_{m}"] * k, predicted=ok[f"predicted_{m}"] * k).dropna(subset=["measured", "predicted"])
        if len(d):
            if f"measured_{m}_lo" in d:      # the measured interval (repeats) as horizontal error bars
                lo, hi = d[f"measured_{m}_lo"] * k, d[f"measured_{m}_hi"] * k
                ax.errorbar(d.measured, d.predicted, xerr=[(d.measured - lo).clip(lower=0).fillna(0),
                                                           (hi - d.measured).clip(lower=0).fillna(0)],
                            fmt="none", ecolor="grey", elinewidth=1, capsize=2, zorder=0)
            sns.scatterplot(data=d, x="measured", y="predicted", hue="policy", style="split", s=60, ax=ax,
                            legend=(ax is axes[-1]))
            lo, hi = d[["measured", "predicted"]].min().min() * 0.8, d[["measured", "predicted"]].max().max() * 1.25
            xs = np.geomspace(lo, hi, 50)
            ax.plot(xs, xs, color="black", lw=1)
            ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, lw=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain_log_ticks(ax.xaxis)
            plain_log_ticks(ax.yaxis)
        ax.set_title(m)
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
    if ax.get_legend():
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("simulator vs runtime (y = x; band: +-10 %; bars: measured interval)")
    save(fig, out, close=True)
    return Path(out)


def plot_errors(df: pd.DataFrame, out: str | Path | None = None):
    """Signed relative error per point, by policy (rows: headline metrics; colour: split)."""
    plt, sns = pyplot()
    ok = df[df.status == "ok"]
    long = ok.melt(id_vars=["id", "policy", "split"], value_vars=[f"{m}_rel_err" for m in HEADLINE],
                   var_name="metric", value_name="rel_err")
    long["metric"] = long.metric.str.removesuffix("_rel_err")
    long["rel_err_pct"] = 100 * long.rel_err
    g = sns.catplot(data=long, x="policy", y="rel_err_pct", hue="split", col="metric", kind="strip",
                    dodge=True, height=3.6, aspect=1.2, s=55, hue_order=list(SPLITS))
    for ax in g.axes.flat:
        ax.axhline(0, color="black", lw=1)
        ax.axhspan(-10, 10, color="grey", alpha=0.15, lw=0)
        ax.set_ylabel("(predicted - measured) / measured, %")
        ax.tick_params(axis="x", rotation=30)
    if out:
        g.savefig(out, dpi=120, bbox_inches="tight")
    return g


def plot_engine_time(df: pd.DataFrame, out: str | Path | None = None):
    """Wall time of each half per point: what the simulator saves over running the model."""
    plt, sns = pyplot()
    ok = df[df.status == "ok"].dropna(subset=["runtime_wall_s", "sim_wall_s"])
    long = ok.melt(id_vars=["id"], value_vars=["runtime_wall_s", "sim_wall_s"], var_name="engine", value_name="seconds")
    long["engine"] = long.engine.map({"runtime_wall_s": "runtime (measured)", "sim_wall_s": "simulator (predicted)"})
    fig, ax = plt.subplots(figsize=(9, 0.28 * max(len(ok), 4) + 1))
    sns.barplot(data=long, y="id", x="seconds", hue="engine", ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds (log)")
    ax.set_ylabel("")
    return save(fig, out)
