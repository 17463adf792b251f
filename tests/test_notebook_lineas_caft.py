"""notebooks/lineas_caft.ipynb runs end to end at smoke size (INTERP_SMOKE=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lineas_caft.ipynb"


@pytest.mark.embedded
def test_lineas_caft_notebook_runs_at_smoke_size(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []) and 'os.environ.get("INTERP_SMOKE") == "1"' in first.source
    monkeypatch.setenv("INTERP_SMOKE", "1")
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not any(out.get("output_type") == "error" for cell in cells for out in cell.outputs)
    text = "".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", "")) for cell in cells for out in cell.outputs)
    assert "units changed" in text and "out-of-distribution" in text
    assert any(out.get("data", {}).get("application/vnd.plotly.v1+json") for cell in cells for out in cell.outputs)
    assert (tmp_path / "maps" / "lineas.safetensors").is_file() and (tmp_path / "sweep" / "table.csv").is_file()
