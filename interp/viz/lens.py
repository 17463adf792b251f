"""Plotly figures for lenses and direct logit attribution, and a page that holds several offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from interp.paths import write_text

if TYPE_CHECKING:
    from interp.dla import DLAResult
    from interp.lens.logit import LensResult


def top_token_figure(result: LensResult, prompt: int = 0):
    """Layers x positions: the top token of each cell as text, its probability as colour."""
    import plotly.graph_objects as go

    rows = result.table[result.table.prompt == prompt]
    if rows.empty:
        raise KeyError(f"no rows for prompt {prompt}")
    layers, positions = sorted(rows.layer.unique()), sorted(rows.position.unique())
    grid = rows.pivot(index="layer", columns="position", values="top_probs").reindex(index=layers, columns=positions)
    tokens = rows.pivot(index="layer", columns="position", values="top_tokens").reindex(index=layers, columns=positions)
    inputs = result.str_tokens[prompt]
    fig = go.Figure(go.Heatmap(
        z=[[cell[0] for cell in row] for row in grid.to_numpy()],
        text=[[repr(cell[0])[1:-1] for cell in row] for row in tokens.to_numpy()],
        texttemplate="%{text}", x=[f"{p}:{inputs[p]!r}" for p in positions], y=[str(layer) for layer in layers],
        colorscale="Blues", zmin=0, zmax=1, colorbar={"title": "p(top)"},
        hovertemplate="layer %{y}<br>position %{x}<br>top %{text} p=%{z:.3f}<extra></extra>",
    ))
    fig.update_layout(title=f"{result.lens} lens ({result.norm} norm scale): top token per layer and position",
                      xaxis_title="position: input token", yaxis_title="layer", height=300 + 18 * len(layers))
    return fig


def token_figure(result: LensResult, prompt: int = 0, position: int | None = None):
    """Probability (left) and rank (right, log scale) of each chosen token per layer at one position."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = result.tokens[result.tokens.prompt == prompt]
    if rows.empty:
        raise KeyError("no chosen tokens: pass tokens=... to logit_lens")
    position = int(rows.position.max()) if position is None else position
    rows = rows[rows.position == position]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("probability", "rank (1 = top)"))
    for token, part in rows.groupby("token", sort=False):
        fig.add_trace(go.Scatter(x=part.layer, y=part.prob, mode="lines+markers", name=repr(token), legendgroup=token), row=1, col=1)
        fig.add_trace(go.Scatter(x=part.layer, y=part["rank"], mode="lines+markers", name=repr(token), legendgroup=token,
                                 showlegend=False), row=1, col=2)
    fig.update_yaxes(type="log", autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=f"{result.lens} lens at position {position} ({result.str_tokens[prompt][position]!r})", height=420)
    return fig


def kl_figure(table: pd.DataFrame, title: str = "KL(final || lens) per layer"):
    """One line per lens: mean KL to the final distribution by layer (log scale). Columns: lens, layer, kl."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for lens, part in table.groupby("lens", sort=False):
        fig.add_trace(go.Scatter(x=part.layer, y=part.kl, mode="lines+markers", name=lens))
    fig.update_layout(title=title, xaxis_title="layer (residual stream entering the block)", yaxis_title="KL, nats",
                      yaxis_type="log", height=450)
    return fig


def dla_figure(result: DLAResult, top: int = 20):
    """Left: per-layer attention (all heads + bias) and MLP contributions; right: the top heads."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = result.table
    blocks = t[t.layer >= 0].assign(part=t.kind.map({"head": "attention", "attn_bias": "attention", "mlp": "MLP"}))
    by_layer = blocks.groupby(["layer", "part"])["mean"].sum().unstack(fill_value=0.0)
    heads = result.top_heads(top)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=("by layer", f"top {len(heads)} heads"))
    for part in by_layer.columns:
        fig.add_trace(go.Bar(x=by_layer.index, y=by_layer[part], name=part), row=1, col=1)
    embed = t[t.kind == "embed"]["mean"].sum()
    fig.add_trace(go.Bar(x=[-1], y=[embed], name="embeddings"), row=1, col=1)
    fig.add_trace(go.Bar(x=heads.component, y=heads["mean"], error_y={"array": heads["std"]}, name="heads", showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="layer (-1: embeddings)", row=1, col=1)
    fig.update_yaxes(title_text="contribution to the logit difference", row=1, col=1)
    fig.update_layout(title=f"Direct logit attribution: {result.summary()}", barmode="relative", height=450)
    return fig


def write_figures(path: str | Path, figures: list, title: str = "interp") -> Path:
    """One HTML page with the figures; plotly.min.js is written beside it (works offline)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bodies = [fig.to_html(full_html=False, include_plotlyjs=False) for fig in figures]
    write_text(path.parent / "plotly.min.js", _plotly_js())
    return write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                    f"<script src='plotly.min.js'></script></head><body>{''.join(bodies)}</body></html>")


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
