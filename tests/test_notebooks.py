"""Every notebook in notebooks/ runs top to bottom at smoke size (INTERP_SMOKE=1), and is committed
without outputs. New notebooks are picked up by the glob: there is no list to edit."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    dirty = [i for i, cell in enumerate(book.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"
    first = next(cell for cell in book.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []) and "INTERP_SMOKE" in first.source, \
        f"{path.name}: the first code cell must be the tagged parameters cell reading INTERP_SMOKE (see notebooks/README.md)"


@pytest.mark.embedded
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_at_smoke_size(path, tmp_path, monkeypatch, embedded):
    from nbclient import NotebookClient

    monkeypatch.setenv("INTERP_SMOKE", "1")  # the kernel inherits the environment
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for cell in book.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors
    assert any(out.get("data", {}).get("application/vnd.plotly.v1+json") for cell in book.cells if cell.cell_type == "code"
               for out in cell.outputs), f"{path.name} shows no plotly figure"
