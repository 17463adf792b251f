"""What an SNMF feature is: its top-activating contexts, what it writes to the vocabulary, its neurons.

``feature_reports`` gathers, per feature: the tokens with the highest coefficients (from Y) with
their contexts and the feature's coefficient on every token of each context; the tokens its output
direction W_down·z promotes and suppresses once passed through the final norm and the
unembedding; and the neurons it combines. ``feature_table`` lays them out as one row per feature,
``write_feature_page`` renders them as one static HTML page (each context a line of tokens shaded
by the feature's coefficient, the top token outlined).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from interp.errors import InputError
from interp.snmf.steer import output_directions

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.snmf.factors import SNMF
    from interp.store import ActivationStore


@dataclass
class FeatureReport:
    feature: int
    norm: float  # ‖z‖: with Y's columns at unit norm, the feature's share of the activations' scale
    neurons: list[tuple[int, float]]  # (neuron, weight), largest |weight| first
    promotes: list[str] = field(default_factory=list)
    suppresses: list[str] = field(default_factory=list)
    examples: pd.DataFrame = field(default_factory=pd.DataFrame)  # rank, activation, left, token, right, tokens, activations, index


class _Contexts:
    """Store rows grouped by context (sorted by position), to show a token with its neighbours."""

    def __init__(self, store: ActivationStore):
        self.table = store.rows()
        self.order = np.lexsort((self.table[:, 1], self.table[:, 0]))
        self.sorted_contexts = self.table[self.order, 0]

    def rows_of(self, context: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.sorted_contexts, [context, context + 1])
        return self.order[lo:hi]


@torch.no_grad()
def feature_reports(snmf: SNMF, store: ActivationStore, model: Model | None = None, features: list[int] | None = None,
                    *, n_examples: int = 8, n_tokens: int = 8, left: int = 24, right: int = 6) -> list[FeatureReport]:
    """Reports for ``features`` (default: all), top contexts from ``store`` (the store the SNMF was
    fitted on). With ``model``, also the promoted / suppressed tokens and decoded context tokens."""
    source = snmf.base.source if snmf.base is not None else snmf.source
    if source.get("source") != "store":
        raise InputError("top contexts need an SNMF fitted on an activation store")
    site, (first, stop) = source["site"], source["rows"]
    if store.n_rows < stop or store.d(site) != snmf.d:
        raise InputError(f"{store.root} is not the store this SNMF was fitted on ({source['store']})")
    if snmf.top_rows is None:
        raise InputError("this SNMF has no top rows (fit it with interp.snmf.fit_snmf)")
    features = list(range(snmf.k)) if features is None else [snmf._check(f) for f in features]
    tokenizer = model.tokenizer if model is not None else None
    directions = output_directions(snmf, model) if model is not None else None
    contexts = _Contexts(store)
    reports = []
    for f in features:
        report = FeatureReport(f, float(snmf.Z[:, f].norm()), snmf.neurons(f))
        if directions is not None and float(directions[f].norm()) > 0:
            logits = model.unembed(directions[f].to(model.device, model.dtype)).float()
            report.promotes = [model.to_string([i]) for i in logits.topk(n_tokens).indices.tolist()]
            report.suppresses = [model.to_string([i]) for i in (-logits).topk(n_tokens).indices.tolist()]
        records = []
        for rank, (value, row) in enumerate(zip(snmf.top_values[f, :n_examples].tolist(), snmf.top_rows[f, :n_examples].tolist(), strict=True)):
            if value <= 0:
                break
            global_row = first + int(row)
            context, position = contexts.table[global_row, 0], contexts.table[global_row, 1]
            rows = contexts.rows_of(int(context))
            acts = _coefficients(snmf, store, site, rows, first, stop)[:, f]
            ids = contexts.table[rows, 2]
            tokens = [tokenizer.decode([int(t)]) if tokenizer is not None else f"<{int(t)}>" for t in ids]
            at = int(np.flatnonzero(contexts.table[rows, 1] == position)[0])
            records.append({
                "rank": rank, "activation": float(value), "context": int(context), "position": int(position),
                "left": "".join(tokens[max(0, at - left) : at]), "token": tokens[at],
                "right": "".join(tokens[at + 1 : at + 1 + right]), "tokens": tokens, "activations": acts.tolist(), "index": at,
            })
        report.examples = pd.DataFrame.from_records(records)
        reports.append(report)
    return reports


def _coefficients(snmf: SNMF, store: ActivationStore, site: str, rows: np.ndarray, first: int, stop: int) -> torch.Tensor:
    """Token coefficients [len(rows), k]: Y for fitted rows, non-negative least squares elsewhere."""
    fitted = (rows >= first) & (rows < stop)
    out = torch.zeros(len(rows), snmf.k)
    if fitted.any():
        out[torch.from_numpy(fitted)] = snmf.y(rows[fitted] - first)
    if (~fitted).any():
        out[torch.from_numpy(~fitted)] = _base_coefficients(snmf, store.read(site, rows[~fitted]))
    return out


def _base_coefficients(snmf: SNMF, acts: torch.Tensor) -> torch.Tensor:
    if snmf.base is None:
        return snmf.coefficients(acts)
    return snmf.base.coefficients(acts) @ snmf.to_base


def feature_table(reports: list[FeatureReport], *, contexts: int = 3, tokens: int = 6, neurons: int = 4) -> pd.DataFrame:
    """One row per feature: its strongest contexts (the token in [brackets]), promoted and
    suppressed tokens, and its largest neurons."""
    rows = []
    for r in reports:
        shown = [f"{e.left[-30:]}[{e.token}]{e.right}".replace("\n", "⏎") for e in r.examples.head(contexts).itertuples()]
        rows.append({
            "feature": r.feature, "norm": round(r.norm, 2),
            "top contexts": " | ".join(shown),
            "promotes": " ".join(repr(t) for t in r.promotes[:tokens]),
            "suppresses": " ".join(repr(t) for t in r.suppresses[:tokens]),
            "neurons": " ".join(f"{i}:{w:+.2f}" for i, w in r.neurons[:neurons]),
        })
    return pd.DataFrame(rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.meta { color: #555; font-size: 0.9em; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.3em 0; line-height: 1.6; }
.peak { outline: 2px solid #c00; }
.act { color: #888; display: inline-block; width: 5em; }
"""


def _example_html(example: pd.Series) -> str:
    """One context, every token shaded by the feature's coefficient relative to the context's largest."""
    peak = max(example["activations"], default=0.0)
    spans = []
    for i, (token, value) in enumerate(zip(example["tokens"], example["activations"], strict=True)):
        alpha = max(0.0, min(1.0, value / peak)) if peak > 0 else 0.0
        outline = ' class="peak"' if i == example["index"] else ""
        spans.append(f'<span{outline} style="background: rgba(255, 120, 0, {alpha:.2f})" title="{value:.3f}">{html.escape(token)}</span>')
    return f'<div class="example"><span class="act">{example["activation"]:.3f}</span>{"".join(spans)}</div>'


def _feature_section(report: FeatureReport, label: str) -> str:
    """One feature: its norm, neurons, decoded tokens and example lines."""
    facts = [f"‖z‖ = {report.norm:.3g}; neurons " + ", ".join(f"{i} ({w:+.3g})" for i, w in report.neurons)]
    if report.promotes:
        facts.append("promotes " + " ".join(html.escape(repr(t)) for t in report.promotes))
        facts.append("suppresses " + " ".join(html.escape(repr(t)) for t in report.suppresses))
    lines = [f"<h2>{html.escape(label)} {report.feature}</h2>", f'<p class="meta">{"<br>".join(facts)}</p>']
    if report.examples.empty:
        lines.append("<p>No token with a positive coefficient.</p>")
    lines += [_example_html(row) for _, row in report.examples.iterrows()]
    return "\n".join(lines)


def write_feature_page(reports: list[FeatureReport], path: str | Path, title: str, *, label: str = "Feature") -> Path:
    """A static HTML page with every report (no scripts, no network)."""
    from interp.paths import write_text

    body = "\n".join(_feature_section(r, label) for r in reports)
    return write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def reports_json(reports: list[FeatureReport]) -> list[dict[str, Any]]:
    """The reports as JSON-able records (examples without the per-token lists)."""
    out = []
    for r in reports:
        examples = r.examples.drop(columns=["tokens", "activations"], errors="ignore").to_dict("records")
        out.append({"feature": r.feature, "norm": r.norm, "neurons": r.neurons, "promotes": r.promotes,
                    "suppresses": r.suppresses, "examples": examples})
    return out
