"""pyproject lists every package (an explicit list is needed to install kernels/ as interp_kernels)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "interp").rglob("__init__.py")}
    # Folders installed under another name (kernels/ as interp_kernels, data/ as interp.resources).
    found |= {name for name, folder in setuptools["package-dir"].items() if (ROOT / folder / "__init__.py").is_file()}
    assert found == set(setuptools["packages"])


@pytest.mark.slow
@pytest.mark.embedded
def test_task_data_works_from_an_installed_wheel(embedded, tmp_path):
    """Build the wheel from a copy of the sources, install it elsewhere, and build both tasks from there."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("interp", "kernels", "data"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "wheels"), str(source)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "wheels").glob("*.whl"))
    shipped = {"ioi.json", "facts.json", "prompts.json", "concepts/sentiment.jsonl", "concepts/space.words.txt", "prompts/neutral_test.txt"}
    assert {f"interp/resources/{name}" for name in shipped} <= set(zipfile.ZipFile(wheel).namelist())
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True, capture_output=True)
    script = (
        "import interp, pathlib, sys\n"
        f"assert pathlib.Path(interp.__file__).is_relative_to({str(target)!r}), interp.__file__\n"
        "from interp.patching import factual_task, ioi_task\n"
        "model = interp.load_model('smollm2-135m')\n"
        "from interp.data.concepts import load_concept, load_prompts\n"
        "print(len(ioi_task(model, 2)), len(factual_task(model, 2)), len(load_concept('sentiment').texts), len(load_prompts('neutral_test')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [int(n) >= 1 for n in done.stdout.split()] == [True] * 4  # tasks, concept and prompts from the installed data
