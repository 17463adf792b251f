"""pyproject lists every package (an explicit list is needed to install kernels/ as interp_kernels)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "interp").rglob("__init__.py")}
    found.add("interp_kernels")
    assert found == listed
