"""notebooks/quickstart.ipynb runs top to bottom (nbclient), so the quick start cannot rot."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """Executed from a folder outside the checkout: the notebook finds its code and configs itself."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("IAD_QUICKSTART_OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout, as `pip install -e .` would give
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell and traceback on any failure
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(res["categories"]) == ["fabric"] and res["calibrated"]["thresholds"]["image_threshold"] is not None
    text = "".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "I-AUROC" in text and "I-FPR" in text and "| decision |" in text
    assert (tmp_path / "predictions.png").is_file() and (tmp_path / "run" / "images" / "fabric_grid.png").is_file()
