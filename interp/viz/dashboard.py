"""Static HTML feature pages: each top example as a line of tokens shaded by the latent's activation."""

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
    """One example: the context with every token shaded by its activation, the top token outlined."""
    tokens, acts, at = row["tokens"], row["activations"], row["index"]
    peak = max(acts) if acts else 0.0
    spans = []
    for i, (token, act) in enumerate(zip(tokens, acts, strict=True)):
        cls = "tok peak" if i == at else "tok"
        spans.append(f'<span class="{cls}" style="{_shade(act, peak)}" title="{act:.3f}">{html.escape(token)}</span>')
    return f'<div class="example"><span class="act">{row["activation"]:.3f}</span>{"".join(spans)}</div>'


def latent_section(latent: int, examples: pd.DataFrame, summary: dict[str, Any] | None = None) -> str:
    lines = [f"<h2>Latent {latent}</h2>"]
    facts = []
    if summary and summary.get("promotes"):
        facts.append("promotes " + " ".join(html.escape(repr(t)) for t in summary["promotes"]))
        facts.append("suppresses " + " ".join(html.escape(repr(t)) for t in summary["suppresses"]))
    if facts:
        lines.append(f'<p class="meta">{"<br>".join(facts)}</p>')
    if examples.empty:
        lines.append("<p>No activation in the data read.</p>")
    lines += [example_html(row) for _, row in examples.iterrows()]
    return "\n".join(lines)


def write_dashboard(path: str | Path, sections: list[str], title: str) -> Path:
    body = "\n".join(sections)
    return write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
