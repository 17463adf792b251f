"""Activation patching, batched.

Each cell (a site at a layer, a position or all positions, optionally one head) is a patched
variant of the base run: denoising runs the corrupt prompts with one clean activation patched in,
noising runs the clean prompts with one corrupt activation. Variants never run one by one:
- a patch at layer L cannot change anything before L, and in a causal model a patch at position p
  cannot change anything before p: a variant starts from the base run's cached
  ``blocks.L.hook_resid_pre`` at positions p.., with the base run's keys and values standing in
  for positions < p (``Model.forward_from`` with ``past``);
- many variants (cells x prompts) share one forward pass, each row patched at its own cell; rows
  are sorted by (layer, position) and a batch starts at its smallest layer and position;
- only the last position's logits are computed (the metric reads nothing else);
- a cell whose source and base activations are identical for every prompt (e.g. positions
  before the first token where the prompts differ) has the base run's metric: no forward at all.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm.auto import tqdm

import interp
from interp.errors import InputError
from interp.models.model import PastKeys, Tokens
from interp.patching.result import PatchingResult

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.patching.tasks import PatchingTask

DEFAULT_KINDS = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Cell:
    """One patch: ``site`` at ``position`` (None: every position) and ``head`` (None: all heads)."""

    site: str
    position: int | None = None
    head: int | None = None


def sweep_cells(model: Model, n_positions: int, kinds: Sequence[str] = DEFAULT_KINDS, *, per_position: bool = True,
                heads: bool = False) -> list[Cell]:
    """Cells for every layer of each kind, by position (or all positions); ``z`` kinds by head when ``heads``."""
    cells = []
    for kind in kinds:
        for layer in range(model.cfg.n_layers):
            site = model.site(kind, layer)
            info = model.site_table.info(site)
            head_range = range(model.cfg.n_heads) if heads and info.head_dim is not None else [None]
            positions = range(n_positions) if per_position else [None]
            cells += [Cell(site, p, h) for h in head_range for p in positions]
    return cells


def activation_patching(
    model: Model,
    task: PatchingTask,
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    direction: str = "denoising",
    per_position: bool = True,
    heads: bool = False,
    cells: Sequence[Cell] | None = None,
    batch_size: int = 64,
    skip_identical: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Patch every cell and measure the task metric. ``cells`` overrides ``kinds``/``per_position``/``heads``.

    ``skip_identical=False`` runs even the cells whose patch changes nothing (a check of the engine).
    """
    start = time.perf_counter()
    base, source, cells = plan(model, task, direction, kinds, cells, per_position=per_position, heads=heads)
    n_prompts, n_positions = base.ids.shape
    infos = {c.site: model.site_table.info(c.site) for c in cells}
    sites = list(dict.fromkeys(c.site for c in cells))
    layers = sorted({infos[s].layer for s in sites})
    starts = [model.site("resid_pre", layer) for layer in layers]
    with torch.no_grad():
        src = model.run_with_cache(source, sites)
        ref = model.run_with_cache(base, list(dict.fromkeys(sites + starts)), stop_at_layer=None)
        prompt_ids = torch.arange(n_prompts, device=base.ids.device)
        base_metric = task.metric(ref.logits[:, -1], prompt_ids)
        past = model.past_keys(base)

    values = torch.empty(len(cells), n_prompts)
    todo = defaultdict(list)  # layer -> indices of cells that need a forward pass
    for index, cell in enumerate(cells):
        region = cell_region(cell, infos[cell.site])
        if skip_identical and torch.equal(src[cell.site][region], ref[cell.site][region]):
            values[index] = base_metric  # nothing to patch: the run is the base run
        else:
            todo[infos[cell.site].layer].append(index)

    def first_position(index: int) -> int:
        position = cells[index].position
        return 0 if position is None else position % n_positions

    rows = sorted((layer, first_position(index), index, prompt)
                  for layer in todo for index in todo[layer] for prompt in range(n_prompts))
    bar = tqdm(total=len(rows), desc=f"{direction} patching", unit="run", disable=not progress)
    with torch.no_grad():
        for chunk_start in range(0, len(rows), batch_size):
            chunk = rows[chunk_start : chunk_start + batch_size]
            metric = _run_variants(model, task, chunk, cells, infos, src, ref, base, past)
            for (_, _, index, prompt), value in zip(chunk, metric.tolist(), strict=True):
                values[index, prompt] = value
            bar.update(len(chunk))
    bar.close()
    table = cell_table(model, task, cells, values.mean(1).tolist())
    return PatchingResult("activation", direction, task.name, table, task.position_labels(model), task.clean_value,
                          task.corrupt_value, time.perf_counter() - start)


def plan(model: Model, task: PatchingTask, direction: str, kinds: Sequence[str], cells: Sequence[Cell] | None, *,
         per_position: bool, heads: bool) -> tuple[Tokens, Tokens, list[Cell]]:
    """(base run, source run, checked cells) of a patching call."""
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction {direction!r}: choose denoising (clean into corrupt) or noising (corrupt into clean)")
    base, source = (task.corrupt, task.clean) if direction == "denoising" else (task.clean, task.corrupt)
    n_positions = base.ids.shape[1]
    cells = list(cells) if cells is not None else sweep_cells(model, n_positions, kinds, per_position=per_position, heads=heads)
    for cell in cells:
        if cell.position is not None and not -n_positions <= cell.position < n_positions:
            raise InputError(f"{cell}: position out of range for prompts of {n_positions} tokens")
        if cell.head is not None and model.site_table.info(cell.site).head_dim is None:
            raise InputError(f"{cell}: {cell.site} has no head dimension")
    return base, source, cells


def cell_table(model: Model, task: PatchingTask, cells: list[Cell], metric: list[float]) -> pd.DataFrame:
    """One row per cell: where it is, the metric (mean over prompts) and the normalised score."""
    n_positions = task.clean.ids.shape[1]
    infos = [model.site_table.info(c.site) for c in cells]
    return pd.DataFrame({
        "kind": [i.kind for i in infos], "layer": [i.layer for i in infos],
        "position": [-1 if c.position is None else c.position % n_positions for c in cells],
        "head": [-1 if c.head is None else c.head for c in cells], "site": [c.site for c in cells],
        "metric": metric, "score": [float(task.normalise(m)) for m in metric],
    })


def cell_region(cell: Cell, info) -> tuple:
    """Index of the patched part of a site's activation (all prompts)."""
    index: list = [slice(None)] * len(info.shape)
    if cell.position is not None:
        index[info.pos_dim] = cell.position
    if cell.head is not None:
        index[info.head_dim] = cell.head
    return tuple(index)


def _run_variants(model: Model, task: PatchingTask, rows: list[tuple[int, int, int, int]], cells: list[Cell],
                  infos: dict, src, ref, base: Tokens, past: PastKeys) -> torch.Tensor:
    """One forward for a batch of (layer, first position, cell, prompt) rows, each patched at its cell.

    The batch starts at its smallest layer and position: what lies before is the base run's.
    """
    layer, start = min(r[0] for r in rows), min(r[1] for r in rows)
    prompts = torch.tensor([r[3] for r in rows])
    by_site: dict[str, list[tuple[int, Cell]]] = defaultdict(list)
    for row, (_, _, index, _) in enumerate(rows):
        by_site[cells[index].site].append((row, cells[index]))
    interventions = []
    for site, entries in by_site.items():
        info = infos[site]
        patch = _suffix(src[site][prompts], info, start)
        mask = torch.zeros(patch.shape, dtype=torch.bool)
        n_positions = base.ids.shape[1]
        for row, cell in entries:  # positions relative to the batch's first position
            position = None if cell.position is None else cell.position % n_positions - start
            mask[(row, *cell_region(Cell(cell.site, position, cell.head), info)[1:])] = True

        def patch_fn(act: torch.Tensor, mask=mask, patch=patch) -> torch.Tensor:
            return torch.where(mask.to(act.device), patch.to(act), act)

        interventions.append(interp.Apply(site, patch_fn))
    resid = _suffix(ref[model.site("resid_pre", layer)][prompts], model.site_table.info(model.site("resid_pre", layer)), start)
    tokens = Tokens(base.ids[prompts], None if base.mask is None else base.mask[prompts])
    with model.intervene(*interventions):
        logits = model.forward_from(layer, resid, tokens, last_only=True, past=past.take(prompts, start) if start else None)
    return task.metric(logits[:, -1], prompts)


def _suffix(act: torch.Tensor, info, start: int) -> torch.Tensor:
    """The positions ``start..`` of an activation."""
    index: list = [slice(None)] * act.ndim
    index[info.pos_dim] = slice(start, None)
    return act[tuple(index)]
