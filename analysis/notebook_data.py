"""Which result file an analysis notebook reads: the newest run of its experiment under the
results folder (results/validation/<experiment>.csv, results/sweep/<experiment>.csv), else the
committed reference under results/reference/ with a note saying so. The notebooks draw in memory
and write nothing. How to run them: docs/validation.md ("Notebooks").
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the committed run each notebook falls back to when this machine has none
REFERENCE = {"validation": "validate_cpu", "sweep": "sweep_k_bits_r"}
# files beside a run's CSV that are not runs (phases and per-request rows of a validation, a sweep's point log)
NOT_RUNS = (".phases.csv", ".points.csv", ".requests.csv")


def runs(kind: str, results: str | Path | None = None, pattern: str = "*") -> list[Path]:
    """The run CSVs of `kind` (validation | sweep) under `results` (default <repo>/results)
    whose stem matches `pattern`, newest first."""
    folder = Path(results if results is not None else ROOT / "results") / kind
    found = [p for p in folder.glob(f"{pattern}.csv") if p.is_file() and not p.name.endswith(NOT_RUNS)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def pick(kind: str, experiment: str | None = None, results: str | Path | None = None,
         pattern: str | None = None) -> tuple[Path, str]:
    """(CSV, note): the newest run of `experiment` (any experiment when None; stems matching
    `pattern` when given), else the committed reference of that experiment (or of the
    notebook's default one) and a note naming the command that writes this machine's."""
    if kind not in REFERENCE:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(REFERENCE)}")
    mine = runs(kind, results, experiment or pattern or "*")
    if mine:
        return mine[0], f"reading the newest run: {mine[0]}"
    ref_dir = ROOT / "results" / "reference" / kind
    name = experiment or REFERENCE[kind]
    ref = ref_dir / f"{name}.csv"
    if not ref.exists():
        ref = ref_dir / f"{REFERENCE[kind]}.csv"
    cmd = "analysis.validate" if kind == "validation" else "analysis.sweep"
    where = Path(results if results is not None else ROOT / "results") / kind
    return ref, (f"NOTE: no run of {experiment or 'any experiment'} in {where}; reading the committed reference "
                 f"{ref.relative_to(ROOT)} (python -m {cmd} experiment={name} writes this machine's)")


def show(fig):
    """A figure (matplotlib Figure or seaborn grid) as an inline PNG, rendered in memory and
    closed: the notebook writes no file."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image
    from matplotlib.figure import Figure

    if not isinstance(fig, Figure):       # a seaborn grid holds its figure
        fig = fig.figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Image(data=buf.getvalue())


def show_file(draw, *args, **kwargs):
    """Inline PNG of a plotting function that insists on writing a file (`draw(*args, out,
    **kwargs)`): it writes into a temporary folder that is removed at once."""
    import tempfile

    from IPython.display import Image

    with tempfile.TemporaryDirectory(prefix="kvtestbed-nb-") as tmp:
        out = Path(tmp) / "figure.png"
        draw(*args, out, **kwargs)
        return Image(data=out.read_bytes())
