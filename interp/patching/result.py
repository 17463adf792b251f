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
        """The cells of one kind as an array (NaN where the table has no cell):

        - [layer, position] for cells by position, [layer, 1] for cells over all positions;
        - [layer, head] for head cells over all positions;
        - [layer, head, position] for head cells by position.

        Positions and heads run from 0 to the largest in the table (so columns line up with token
        positions and head numbers); cells over all positions or all heads get one extra last entry.
        """
        rows = self._rows(kind)
        heads, positions = self._axis(rows, "head"), self._axis(rows, "position")
        index = [rows["layer"].to_numpy()]
        shape = [int(rows["layer"].max()) + 1]
        if heads != [-1]:
            index.append(rows["head"].map(heads.index).to_numpy())
            shape.append(len(heads))
        if positions != [-1] or heads == [-1]:
            index.append(rows["position"].map(positions.index).to_numpy())
            shape.append(len(positions))
        out = np.full(shape, np.nan)
        out[tuple(index)] = rows[column].to_numpy()
        return out

    def _rows(self, kind: str) -> pd.DataFrame:
        rows = self.table[self.table.kind == kind]
        if rows.empty:
            raise KeyError(f"no cells of kind {kind!r}; kinds here: {sorted(self.table.kind.unique())}")
        return rows

    @staticmethod
    def _axis(rows: pd.DataFrame, column: str) -> list[int]:
        """Values along one axis of ``grid``: 0..max, then -1 (all) if present."""
        values = set(rows[column].tolist())
        top = max(values)
        return [*range(top + 1)] + ([-1] if -1 in values else [])

    def axes(self, kind: str) -> tuple[np.ndarray, list[str], list[str]]:
        """(2-D grid, row labels, column labels) of one heatmap panel: layers down (one row per layer
        and head when heads and positions are both swept), positions or heads across."""
        rows, grid = self._rows(kind), self.grid(kind)
        heads, positions = self._axis(rows, "head"), self._axis(rows, "position")
        head_names = ["all heads" if h == -1 else f"H{h}" for h in heads]
        position_names = ["all positions" if p == -1 else self.position_labels[p] if p < len(self.position_labels) else str(p)
                          for p in positions]
        layers = [f"L{layer}" for layer in range(grid.shape[0])]
        if grid.ndim == 3:
            return grid.reshape(-1, grid.shape[2]), [f"{layer} {head}" for layer in layers for head in head_names], position_names
        return grid, layers, head_names if heads != [-1] else position_names

    def correlation(self, other: PatchingResult, kind: str) -> float:
        """Pearson correlation of the scores of ``kind`` cells present in both results."""
        keys = ["kind", "layer", "position", "head"]
        merged = self.table[self.table.kind == kind].merge(other.table[other.table.kind == kind], on=keys, suffixes=("_a", "_b"))
        if len(merged) < 2:
            raise ValueError(f"fewer than two common {kind} cells")
        return float(np.corrcoef(merged.score_a, merged.score_b)[0, 1])

    def heatmap(self, kinds: list[str] | None = None):
        """A plotly figure: one panel per kind, layers (x heads) down, positions (or heads) across."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        kinds = kinds or list(dict.fromkeys(self.table.kind))
        panels = [self.axes(kind) for kind in kinds]
        shared = len({tuple(rows) for _, rows, _ in panels}) == 1
        fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=shared)
        limit = float(np.nanmax(np.abs(self.table.score.to_numpy()))) or 1.0
        for i, (grid, row_labels, column_labels) in enumerate(panels, start=1):
            fig.add_trace(go.Heatmap(z=grid, x=column_labels, y=row_labels, zmin=-limit, zmax=limit,
                                     colorscale="RdBu", reversescale=True, showscale=i == len(kinds)), row=1, col=i)
        fig.update_yaxes(title_text="layer", row=1, col=1)
        tallest = max(len(rows) for _, rows, _ in panels)
        fig.update_layout(title=f"{self.method} patching ({self.direction}), {self.task}",
                          height=max(420, 120 + 18 * tallest))
        return fig
