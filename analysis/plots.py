"""Plotting helpers every analysis figure shares: headless pyplot and seaborn, plain tick labels
on log axes, and one way to lay out and save a figure.

The figures themselves live beside the tables they draw: validate_plots.py (predicted vs
measured), sweep_plots.py (grids, Pareto front, paper reproductions), phases.py (phase bars).
"""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """(matplotlib.pyplot, seaborn) on the Agg backend: figures go to files, and a notebook
    still shows what it saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def plain_log_ticks(axis) -> None:
    """Major ticks as plain numbers (`0.5`, `20`), no crowded minor labels (a log axis's default
    is 10^x with every minor tick labelled)."""
    import matplotlib.ticker as ticker

    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def save(fig, out: str | Path | None, dpi: int = 120, close: bool = False):
    """tight_layout, then the file at `out` (none when `out` is None); close=True frees the
    figure (a command writing many), a notebook keeps it to display."""
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=dpi, bbox_inches="tight")
    if close:
        plt, _ = pyplot()
        plt.close(fig)
    return fig
