"""A simple static page of feature sections, each example a line of tokens shaded by its value.

The feature dashboard (``dashboard.py``) scans a store with a ``FeatureSource``; this page shows
examples a caller already has (SNMF's top contexts come from its fitted ``Y``, no scan needed).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from interp.paths import write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.meta { color: #555; font-size: 0.9em; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.3em 0; line-height: 1.6; }
.tok { border-radius: 2px; }
.peak { outline: 2px solid #c00; }
.act { color: #888; display: inline-block; width: 5em; }
"""


def _shade(value: float, peak: float) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, value / peak))
    return f"background: rgba(255, 120, 0, {alpha:.2f})"


def example_html(row: pd.Series | dict[str, Any]) -> str:
    """One example (``tokens``, ``activations``, ``index`` of the top token, ``activation``): every
    token shaded by its value, the top one outlined."""
    tokens, values, at = row["tokens"], row["activations"], row["index"]
    peak = max(values) if len(values) else 0.0
    spans = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
        cls = "tok peak" if i == at else "tok"
        spans.append(f'<span class="{cls}" style="{_shade(value, peak)}" title="{value:.3f}">{html.escape(token)}</span>')
    return f'<div class="example"><span class="act">{row["activation"]:.3f}</span>{"".join(spans)}</div>'


def write_sections(path: str | Path, sections: list[str], title: str) -> Path:
    """The page: a title and the given HTML sections, written atomically."""
    body = "\n".join(sections)
    return write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
