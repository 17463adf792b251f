"""notebooks/snmf.ipynb runs top to bottom at smoke size (INTERP_SMOKE=1) and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "snmf.ipynb"


def test_snmf_notebook_is_committed_without_outputs():
    book = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(book)
    assert not [c for c in book.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    first = next(c for c in book.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []) and "INTERP_SMOKE" in first.source


@pytest.mark.embedded
def test_snmf_notebook_runs_at_smoke_size(tmp_path, monkeypatch, embedded):
    from nbclient import NotebookClient

    monkeypatch.setenv("INTERP_SMOKE", "1")  # the kernel inherits the environment
    book = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert any(o.get("data", {}).get("application/vnd.plotly.v1+json") for c in book.cells if c.cell_type == "code"
               for o in c.outputs)
    assert (tmp_path / "runs/tutorials/snmf/features.html").exists()
