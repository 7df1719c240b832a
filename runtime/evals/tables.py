"""What every task's table and figure share: the policy order (`full` first), a policy's rows
paired with full's on the same samples, an interval as three columns, and headless plotting.
The statistics themselves are in `stats.py`; why they are paired: docs/evals.md.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .stats import Interval


def ci_columns(prefix: str, iv: Interval) -> dict:
    return {prefix: iv.mean, f"{prefix}_lo": iv.lo, f"{prefix}_hi": iv.hi}


def policy_order(df: pd.DataFrame) -> list[str]:
    order = list(dict.fromkeys(df["policy"]))
    return ["full"] + [p for p in order if p != "full"] if "full" in order else order


def by_policy(d: pd.DataFrame):
    """(policy, its rows, its successful rows) for each policy in `d`, full first."""
    for pol in policy_order(d):
        g = d[d.policy == pol]
        yield pol, g, g[g.ok]


def paired(g: pd.DataFrame, base: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """The policy's successful rows joined with full's on sample_id."""
    return g[g.ok].merge(base[base.ok][["sample_id", *cols]], on="sample_id", suffixes=("", "_full"))


def plotting():
    """(pyplot, seaborn) on matplotlib's file-only Agg backend, imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
