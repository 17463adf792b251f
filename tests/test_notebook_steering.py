"""notebooks/steering.ipynb runs end to end at smoke size (INTERP_SMOKE=1)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "steering.ipynb"


@pytest.mark.embedded
def test_steering_notebook_runs_at_smoke_size(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    assert 'SMOKE = os.environ.get("INTERP_SMOKE") == "1"' in notebook.cells[1].source
    monkeypatch.setenv("INTERP_SMOKE", "1")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                      for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "held-out accuracy" in outputs and "sae-latent" in outputs
    assert not any(out.get("output_type") == "error" for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
