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


# What a notebook must print (text outputs) and leave on disk (relative to its working folder) besides
# running without errors and showing a plotly figure. Each notebook runs once in the suite.
EXPECTED = {
    "steering.ipynb": {"printed": ["held-out accuracy", "sae-latent"], "files": []},
    "lenses.ipynb": {"printed": ["logit difference"], "files": []},
    "lineas_caft.ipynb": {"printed": ["units changed", "out-of-distribution"],
                          "files": ["maps/lineas.safetensors", "sweep/table.csv"]},
    "snmf.ipynb": {"printed": [], "files": ["runs/tutorials/snmf/features.html"]},
}


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
    expected = EXPECTED.get(path.name, {"printed": [], "files": []})
    text = "".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                   for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)
    assert not [p for p in expected["printed"] if p not in text], f"{path.name} did not print {expected['printed']}"
    assert not [f for f in expected["files"] if not (tmp_path / f).is_file()], f"{path.name} did not write {expected['files']}"
