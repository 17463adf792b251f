"""Every Python block of README.md runs, in order, in one namespace (as a reader would paste them).

A block may be left out only where it needs a GPU or the HF hub, marked by an HTML comment on the
line before it: ``<!-- not-run: needs the hub -->`` (the reason must name the GPU or the hub).
"""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^(?:<!--\s*not-run:(?P<why>[^\n]*?)-->\s*\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, reason it is not run or None) of every ```python block."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("why")) for m in BLOCK.finditer(text)]


def test_every_python_block_is_found_and_skips_name_a_gpu_or_the_hub():
    blocks = python_blocks()
    assert len(blocks) == README.read_text().count("```python")
    assert len(blocks) >= 3
    for line, _, why in blocks:
        assert why is None or re.search(r"\b(GPU|hub)\b", why), f"README.md:{line}: not-run only for a GPU or the hub ({why!r})"


@pytest.mark.embedded
def test_readme_python_blocks_run(embedded, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks write files (a store) where they run
    namespace: dict = {}
    ran = 0
    for line, code, why in python_blocks():
        if why is None:
            name = f"README.md:{line}"
            linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # nnsight reads a trace's source
            exec(compile(code, name, "exec"), namespace)  # noqa: S102 - running the README is the test
            ran += 1
    assert ran >= 3 and namespace["model"] is not None
    assert capsys.readouterr().out.strip()  # the quick tour prints a generation
