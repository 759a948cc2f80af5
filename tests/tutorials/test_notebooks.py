"""The tutorials in ``tutorials/`` run top to bottom in quick mode (``TILTED_PRIORS_QUICK=1``), stored without
outputs, and the README links each of them."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and "TILTED_PRIORS_QUICK" in code[0].source, "the first code cell must read TILTED_PRIORS_QUICK"
    stored = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not stored, f"{path.name} is stored with outputs (code cells {stored}): clear them before committing"
    monkeypatch.setenv("TILTED_PRIORS_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises CellExecutionError


def test_readme_links_every_tutorial():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if f"tutorials/{p.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"
