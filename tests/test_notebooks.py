"""The analysis notebooks run headless (nbclient): they read the newest run of their experiment
(else the committed reference, with a note), draw in memory and write no file."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from analysis.notebook_data import pick, runs

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "results" / "reference"


def _touch(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("id\n")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_pick_reads_the_newest_run_and_skips_side_files(tmp_path):
    old = _touch(tmp_path / "validation" / "validate_cpu.csv", 300)
    new = _touch(tmp_path / "validation" / "validate_quick.csv", 100)
    _touch(tmp_path / "validation" / "validate_quick.phases.csv", 0)       # newer, but not a run
    _touch(tmp_path / "sweep" / "sweep_k_bits_r.points.csv", 0)
    assert runs("validation", tmp_path) == [new, old]
    assert pick("validation", None, tmp_path) == (new, f"reading the newest run: {new}")
    assert pick("validation", "validate_cpu", tmp_path)[0] == old
    csv, note = pick("sweep", "sweep_k_bits_r", tmp_path)     # only a point log there: the reference
    assert csv == REF / "sweep" / "sweep_k_bits_r.csv" and note.startswith("NOTE: no run of sweep_k_bits_r")
    assert "python -m analysis.sweep experiment=sweep_k_bits_r" in note


def test_pick_falls_back_to_the_experiments_reference_else_the_notebooks():
    empty = Path("/nonexistent-kvtestbed-results")
    assert pick("sweep", "paper_speccache_rag", empty)[0] == REF / "sweep" / "paper_speccache_rag.csv"
    assert pick("validation", "validate_unheard_of", empty)[0] == REF / "validation" / "validate_cpu.csv"
    csv, note = pick("validation", None, empty)
    assert csv == REF / "validation" / "validate_cpu.csv" and "no run of any experiment" in note
    with pytest.raises(ValueError, match="kind='nope'"):
        pick("nope")


def _execute(notebook: str, params: str, cwd: Path) -> list:
    nb = nbformat.read(ROOT / notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    cells[0].source += "\n" + params
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _pngs(outputs) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def _tracked_state():
    """What executing a notebook must not change: the committed figures, and no *.nbconvert.ipynb."""
    return ({p: p.stat().st_mtime_ns for p in REF.rglob("*.png")}, sorted(ROOT.glob("analysis/*.nbconvert.ipynb")))


def test_validate_notebook_falls_back_to_the_reference_with_a_note(tmp_path):
    before = _tracked_state()
    results = tmp_path / "results"          # no run on this "machine"
    outputs = _execute("analysis/validate.ipynb", f"RESULTS = {str(results)!r}", tmp_path)
    assert not [o for o in outputs if o.output_type == "error"]
    text = _text(outputs)
    assert "NOTE: no run of any experiment" in text and "validate_cpu.csv" in text
    assert _pngs(outputs) == 3                               # fidelity, errors, engine time: inline
    assert list(tmp_path.iterdir()) == [] and _tracked_state() == before


def test_sweep_notebook_reads_the_newest_run(tmp_path):
    before = _tracked_state()
    results = tmp_path / "results"
    mine = results / "sweep" / "sweep_k_bits_r.csv"
    mine.parent.mkdir(parents=True)
    shutil.copy(REF / "sweep" / "sweep_k_bits_r.csv", mine)
    outputs = _execute("analysis/sweep.ipynb", f"RESULTS = {str(results)!r}", tmp_path)
    assert not [o for o in outputs if o.output_type == "error"]
    text = _text(outputs)
    assert f"reading the newest run: {mine}" in text
    # the paper section: no paper run here, so the references with a note, and a verdict per figure
    assert text.count("NOTE: no run of paper_") == 2 and "figures inside the paper's band" in text
    assert _pngs(outputs) == 4 + 2                           # 2 heatmaps, RAG, Pareto; 2 paper figures
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == \
        [Path("results"), Path("results/sweep"), Path("results/sweep/sweep_k_bits_r.csv")]
    assert _tracked_state() == before
