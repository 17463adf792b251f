"""How a training run spreads over the ranks of a ``torchrun`` job (see ``interp.distributed``).

- ``data``: every rank trains every dictionary on its own part of each global batch. Each loss
  term is a sum over rows divided by a whole-batch quantity (rows, total variance), computed here
  with all-reduces, so the ranks' losses add up to the global batch's loss; their gradients and
  firing counts are summed, and every rank takes the same optimizer step (one process's step on
  the whole batch, up to float rounding).
- ``dictionaries``: rank r owns dictionaries r, r + N, ... of a k sweep and trains them on every
  batch; nothing is exchanged while training.
"""

from __future__ import annotations

from typing import Any

import torch

from interp import distributed
from interp.errors import InputError


class BatchReduce:
    """Whole-batch quantities of a data-parallel step (one process: this batch's own)."""

    def __init__(self, ranks: distributed.Ranks):
        self.ranks = ranks
        self.rows = 0.0

    def totals(self, target: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(rows, total variance sum ||t - mean||^2) of the global batch; ``rows`` is kept for the step.
        (In one process these are bit for bit ``len(target)`` and ``(target - target.mean(0)).pow(2).sum()``.)"""
        target = target.detach()
        sums = self.ranks.all_reduce(torch.cat([target.sum(0), target.new_tensor([target.shape[0]])]))
        self.rows = float(sums[-1])
        total_var = self.ranks.all_reduce((target - sums[:-1] / sums[-1]).pow(2).sum())
        return self.rows, total_var

    def sum_stats(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-rank shares of the batch's statistics, summed over the ranks, as floats."""
        summed = self.ranks.all_reduce(torch.stack([v.double() for v in parts.values()]))
        return dict(zip(parts, summed.tolist()))


def parallel_mode(choice: str, n_dictionaries: int, world_size: int) -> str:
    """``data`` or ``dictionaries`` (see ``TrainConfig.parallel``)."""
    if choice not in ("auto", "data", "dictionaries"):
        raise InputError(f"parallel={choice!r}: choose auto, data or dictionaries")
    if choice == "dictionaries" and n_dictionaries < world_size:
        raise InputError(f"--parallel dictionaries gives each of the {world_size} ranks its own dictionaries, but the run "
                         f"trains {n_dictionaries}; use --parallel data, more values of --k, or fewer ranks")
    if choice == "auto":
        return "dictionaries" if world_size > 1 and n_dictionaries % world_size == 0 else "data"
    return choice


def merge_histories(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One history from the ranks' (each rank logs its own dictionaries at the same steps)."""
    merged: dict[int, dict[str, Any]] = {}
    for part in parts:
        for entry in part:
            merged.setdefault(entry["step"], {}).update(entry)
    return [merged[step] for step in sorted(merged)]
