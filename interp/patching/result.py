"""Patching results: one table for every method, heatmaps, and agreement between methods."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class PatchingResult:
    """``table`` has one row per cell: kind, layer, position (-1: all), head (-1: none), metric
    (the task metric, mean over prompts; for attribution methods the estimate) and score (the
    metric normalised so that clean = 1 and corrupt = 0 for denoising)."""

    method: str
    direction: str
    task: str
    table: pd.DataFrame
    position_labels: list[str]
    clean_value: float
    corrupt_value: float
    seconds: float

    def grid(self, kind: str, column: str = "score") -> np.ndarray:
        """[layer, position] (or [layer, head] for head cells over all positions) of one kind."""
        rows = self.table[self.table.kind == kind]
        if rows.empty:
            raise KeyError(f"no cells of kind {kind!r}; kinds here: {sorted(self.table.kind.unique())}")
        axis = "head" if (rows["position"] == -1).all() and (rows["head"] >= 0).any() else "position"
        index = rows[axis].to_numpy()
        if (index == -1).all():  # per_position=False: one cell per layer, every position at once
            index = np.zeros_like(index)
        out = np.full((rows["layer"].max() + 1, index.max() + 1), np.nan)
        out[rows["layer"].to_numpy(), index] = rows[column].to_numpy()
        return out

    def correlation(self, other: PatchingResult, kind: str) -> float:
        """Pearson correlation of the scores of ``kind`` cells present in both results."""
        keys = ["kind", "layer", "position", "head"]
        merged = self.table[self.table.kind == kind].merge(other.table[other.table.kind == kind], on=keys, suffixes=("_a", "_b"))
        if len(merged) < 2:
            raise ValueError(f"fewer than two common {kind} cells")
        return float(np.corrcoef(merged.score_a, merged.score_b)[0, 1])

    def heatmap(self, kinds: list[str] | None = None):
        """A plotly figure: one layer x position (or layer x head) panel per kind."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        kinds = kinds or list(dict.fromkeys(self.table.kind))
        fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
        limit = float(np.nanmax(np.abs(self.table.score.to_numpy()))) or 1.0
        for i, kind in enumerate(kinds, start=1):
            grid = self.grid(kind)
            cells = self.table[self.table.kind == kind]
            all_positions = (cells.position == -1).all()
            by_head = all_positions and (cells["head"] >= 0).any()
            x = [f"H{h}" for h in range(grid.shape[1])] if by_head else ["all"] if all_positions else self.position_labels[: grid.shape[1]]
            fig.add_trace(go.Heatmap(z=grid, x=x, y=list(range(grid.shape[0])), zmin=-limit, zmax=limit,
                                     colorscale="RdBu", reversescale=True, showscale=i == len(kinds)), row=1, col=i)
        fig.update_yaxes(title_text="layer", row=1, col=1)
        fig.update_layout(title=f"{self.method} patching ({self.direction}), {self.task}", height=420 + 8 * len(self.position_labels))
        return fig
