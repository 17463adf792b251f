"""notebooks/lenses.ipynb runs end to end at smoke size (INTERP_SMOKE=1) and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lenses.ipynb"


@pytest.mark.embedded
def test_lenses_notebook_runs_at_smoke_size(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit the notebook without outputs"
    assert 'SMOKE = os.environ.get("INTERP_SMOKE") == "1"' in code[0].source
    monkeypatch.setenv("INTERP_SMOKE", "1")
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("logit difference" in out.get("text", "") for out in outputs)  # the DLA summary printed
