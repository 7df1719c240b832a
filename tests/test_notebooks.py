"""The analysis notebooks run headless (nbclient) on the small committed result files."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
CASES = [("analysis/validate.ipynb", "results/reference/validation/validate_cpu.csv",
          ["validate_cpu.png", "validate_cpu_errors.png", "validate_cpu_engine_time.png"]),
         ("analysis/sweep.ipynb", "results/reference/sweep/sweep_k_bits_r.csv",
          ["sweep_k_bits_r_heatmaps.png", "sweep_k_bits_r_rag.png", "sweep_k_bits_r_pareto.png"])]


@pytest.mark.parametrize("notebook,csv,figures", CASES, ids=["validate", "sweep"])
def test_notebook_executes_on_committed_results(tmp_path, notebook, csv, figures):
    src = ROOT / csv
    assert src.exists(), f"{csv} is not committed; run the command in the notebook's first cell"
    data = tmp_path / src.name
    shutil.copy(src, data)                      # figures land beside this copy, not in the repo
    nb = nbformat.read(ROOT / notebook, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"CSV = {str(data)!r}"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    for f in figures:
        assert (tmp_path / f).stat().st_size > 10_000, f
