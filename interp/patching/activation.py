"""Activation patching, batched.

Each cell (a site at a layer, a position or all positions, optionally one head) is a patched
variant of the base run: denoising runs the corrupt prompts with one clean activation patched in,
noising runs the clean prompts with one corrupt activation. Variants never run one by one, and
none computes more than the metric needs:
- a patch at layer L cannot change anything before L, and in a causal model a patch at position p
  cannot change anything before p: a variant starts from the base run's cached
  ``blocks.L.hook_resid_pre`` at positions p.., with the base run's keys and values standing in
  for positions < p (``Model.forward_from`` with ``past``);
- a patch of attn_out, mlp_out or resid_post at block L is a patch of the residual stream entering
  block L+1, and starts there (``_Router``); a position-local patch in the last block at any
  position but the last changes nothing the metric reads;
- many variants (cells x prompts) share one forward pass, each row patched at its own cell; rows
  are sorted by (layer, position), a batch starts at its smallest layer and position, and groups
  are merged while a calibrated cost model says merging is cheaper than another call;
- only the last position's logits are computed, and the last block's MLP runs on the last
  position only (other positions matter there only through their keys and values);
- a cell whose source and base activations are identical for every prompt (e.g. positions
  before the first token where the prompts differ) has the base run's metric: no forward at all.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import nn
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
    Called inside ``model.intervene(...)``, every run (source, base and patched) has those
    interventions too, and each patched run is a whole forward pass: the shortcuts below would
    apply an edit twice or to partial activations.
    """
    start = time.perf_counter()
    base, source, cells = plan(model, task, direction, kinds, cells, per_position=per_position, heads=heads)
    n_prompts = base.ids.shape[0]
    plain = model.active_interventions > 0
    with torch.inference_mode():  # no autograd bookkeeping at all
        src = model.run_with_cache(source, list(dict.fromkeys(c.site for c in cells)))
        ref = model.run_with_cache(base, _base_sites(model, cells), stop_at_layer=None)
        prompt_ids = torch.arange(n_prompts, device=base.ids.device)
        base_metric = task.metric(ref.logits[:, -1], prompt_ids)
        past = model.past_keys(base)
        router = _Router(model, base.ids.shape[1], src, ref, shortcuts=not plain, skip_local=skip_identical)
        routes = [router.route(cell) for cell in cells]

    values = torch.empty(len(cells), n_prompts)
    todo, final = [], []  # cells that need blocks run; cells that need only the unembedding
    for index, route in enumerate(routes):
        if route is None or (skip_identical and route.is_identity(router)):
            values[index] = base_metric  # nothing reaches the metric: the run is the base run
        elif route.layer == model.cfg.n_layers:
            final.append(index)
        else:
            todo.append(index)
    with torch.inference_mode():
        for index in final:
            values[index] = task.metric(model.unembed(router.final_resid(routes[index])), prompt_ids)

    rows = sorted((routes[index].layer, routes[index].first_position, index, prompt)
                  for index in todo for prompt in range(n_prompts))
    overhead = _call_overhead(model, router, base, past, batch_size) if rows and not plain else 0.0
    bar = tqdm(total=len(rows), desc=f"{direction} patching", unit="run", disable=not progress)
    with torch.inference_mode():
        for chunk in _batches(rows, model.cfg.n_layers, base.ids.shape[1], batch_size, overhead):
            metric = _run_variants(model, task, chunk, routes, router, base, None if plain else past)
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


# Kinds whose value at a position reaches other positions only through the residual stream after
# their block: in the last block they change the last position's logits only at the last position.
_LOCAL_KINDS = frozenset({"z", "ln1_post", "attn_out", "resid_mid", "ln2", "mlp_post", "ln2_post", "mlp_out", "resid_post"})


@dataclass(frozen=True)
class _Route:
    """How one cell runs: the base run from block ``layer`` on, with ``sources[key]`` patched into
    ``site`` over ``region`` (``layer == n_layers``: only the final norm and unembedding)."""

    layer: int
    site: str
    key: str
    region: tuple
    first_position: int

    def is_identity(self, router: _Router) -> bool:
        return torch.equal(router.sources[self.key][self.region], router.ref[self.site][self.region])


class _Router:
    """Maps cells to the cheapest equivalent run.

    A patch of ``attn_out``, ``mlp_out`` or ``resid_post`` at block L changes, outside block L, only
    the residual stream entering block L+1 (the MLP is position-wise: for attn_out only the patched
    positions pass through it again). So such a cell starts at block L+1 as a residual patch, and
    after the last block it needs only the unembedding. The block structure this relies on is
    checked on the base run (resid_mid = resid_pre + attn_out and resid_post = resid_mid +
    mlp_out bit for bit, the MLP recomputed, the unembedding reproducing the logits); where a check
    fails the cell runs as it is.
    """

    def __init__(self, model: Model, n_positions: int, src, ref, *, shortcuts: bool, skip_local: bool):
        self.model, self.n_positions, self.src, self.ref = model, n_positions, src, ref
        self.shortcuts, self.skip_local = shortcuts, skip_local and shortcuts
        self.sources: dict[str, torch.Tensor] = {}
        self._routable: dict[str, str | None] = {}
        last = model.cfg.n_layers - 1
        final = ref[model.site("resid_post", last)][:, -1:]
        self.unembed_ok = torch.allclose(model.unembed(final)[:, -1], ref.logits[:, -1], rtol=1e-5, atol=1e-5)
        # The last block's MLP may run on the last position alone if it maps a tensor to a tensor.
        self.trim_ok = shortcuts and isinstance(model.mlp_branch(last)(final), torch.Tensor)

    def final_resid(self, route: _Route) -> torch.Tensor:
        """The last position of the final residual stream with ``route``'s patch (which may be elsewhere)."""
        resid = self.ref[self.model.site("resid_post", self.model.cfg.n_layers - 1)].clone()
        resid[route.region] = self.sources[route.key][route.region]
        return resid[:, -1]

    def route(self, cell: Cell) -> _Route | None:
        model = self.model
        info = model.site_table.info(cell.site)
        layer, last_layer = info.layer, model.cfg.n_layers - 1
        position = None if cell.position is None else cell.position % self.n_positions
        if (self.skip_local and info.kind in _LOCAL_KINDS and layer == last_layer
                and position not in (None, self.n_positions - 1)):
            return None  # a position-local change in the last block never reaches the last position
        key = self._residual_source(cell, info) if self.shortcuts else None
        if key is None or (layer == last_layer and not self.unembed_ok):
            self.sources.setdefault(cell.site, self.src[cell.site])
            region = cell_region(Cell(cell.site, position, cell.head), info)
            if not self.shortcuts:  # the whole forward pass, from the embeddings
                return _Route(0, cell.site, cell.site, region, 0)
            return _Route(layer, cell.site, cell.site, region, position or 0)
        site = model.site("resid_post", last_layer) if layer == last_layer else model.site("resid_pre", layer + 1)
        region = cell_region(Cell(site, position), model.site_table.info(site))
        return _Route(layer + 1, site, key, region, position or 0)

    def _residual_source(self, cell: Cell, info) -> str | None:
        """Key of the patched residual stream after the cell's block, or None if the cell cannot be one."""
        if cell.head is not None or info.kind not in ("attn_out", "mlp_out", "resid_post"):
            return None
        if info.kind == "resid_post":
            self.sources.setdefault(cell.site, self.src[cell.site])
            return cell.site
        if cell.site not in self._routable:
            self._routable[cell.site] = self._patched_resid_post(cell.site, info)
        return self._routable[cell.site]

    def _patched_resid_post(self, site: str, info) -> str | None:
        """Compute resid_post with ``site`` patched (all positions), if the block is known to be
        resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_branch(resid_mid)."""
        model, layer, ref = self.model, info.layer, self.ref
        if not model.site_table.has("resid_mid", layer):
            return None  # a parallel block: attention and MLP both read resid_pre
        pre, mid, post = (model.site(kind, layer) for kind in ("resid_pre", "resid_mid", "resid_post"))
        mlp_out = model.site("mlp_out", layer)
        if not torch.equal(ref[mid] + ref[mlp_out], ref[post]):
            return None
        key = f"{site} -> resid_post"
        if info.kind == "mlp_out":
            self.sources[key] = ref[mid] + self.src[site]
            return key
        branch = model.mlp_branch(layer)
        scale = float(ref[post].abs().max())
        recomputed = branch(ref[mid])
        if not (torch.equal(ref[pre] + ref[site], ref[mid]) and isinstance(recomputed, torch.Tensor)
                and torch.allclose(recomputed, ref[mlp_out], rtol=1e-4, atol=1e-6 * scale)):
            return None
        patched_mid = ref[pre] + self.src[site]
        patched = patched_mid + branch(patched_mid)
        same = (self.src[site] == ref[site]).all(-1, keepdim=True)  # keep the base run's bits where nothing changed
        self.sources[key] = torch.where(same, ref[post], patched)
        return key


def _base_sites(model: Model, cells: Sequence[Cell]) -> list[str]:
    """Sites the base run keeps: the patched sites, what routes read, and the inputs of the blocks runs start at."""
    last = model.cfg.n_layers - 1
    sites = [model.site("resid_pre", last), model.site("resid_post", last)]
    for cell in cells:
        layer = model.site_table.info(cell.site).layer
        sites.append(cell.site)
        sites += [model.site(kind, layer) for kind in ("resid_pre", "resid_mid", "mlp_out", "resid_post")
                  if model.site_table.has(kind, layer)]
        if layer < last:
            sites.append(model.site("resid_pre", layer + 1))
    return list(dict.fromkeys(sites))


def _batches(rows: list[tuple[int, int, int, int]], n_layers: int, n_positions: int, batch_size: int,
             overhead: float) -> list[list[tuple[int, int, int, int]]]:
    """Split sorted (layer, first position, cell, prompt) rows into forward passes.

    A pass costs about (blocks run) x (overhead + rows x positions run): every row starts at the
    pass's first layer and position, so merging rows that start later wastes work, and splitting
    pays the per-call ``overhead`` (in token-positions) again. Groups of rows with the same start
    are merged greedily while that lowers the estimated cost.
    """
    def cost(layer: int, start: int, n: int) -> float:
        return (n_layers - layer) * (overhead + n * (n_positions - start))

    batches: list[list] = []
    starts: list[tuple[int, int]] = []  # (first layer, first position) of each batch
    for (layer, position), group in itertools.groupby(rows, key=lambda r: r[:2]):
        group = list(group)
        while group:
            head, group = group[:batch_size], group[batch_size:]
            if batches and len(batches[-1]) + len(head) <= batch_size:
                last, (first_layer, first_position) = batches[-1], starts[-1]
                merged = (first_layer, min(first_position, position))
                if cost(*merged, len(last) + len(head)) <= cost(first_layer, first_position, len(last)) + cost(layer, position, len(head)):
                    last.extend(head)
                    starts[-1] = merged
                    continue
            batches.append(head)
            starts.append((layer, position))
    return batches


def _call_overhead(model: Model, router: _Router, base: Tokens, past: PastKeys, batch_size: int) -> float:
    """The fixed cost of one forward call, in token-positions of the last block (timed here, best of 3)."""
    layer, (n_prompts, n_positions) = model.cfg.n_layers - 1, base.ids.shape
    resid = router.ref[model.site("resid_pre", layer)]

    def seconds(rows: int, positions: int) -> float:
        start = n_positions - positions
        take = torch.arange(rows) % n_prompts
        tokens = base.take(take)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(3):
                began = time.perf_counter()
                model.forward_from(layer, resid[take, start:], tokens, last_only=True, past=past.take(take, start) if start else None)
                if resid.is_cuda:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - began)
        return best

    rows = min(batch_size, n_prompts * 4)
    one, many = seconds(1, 1), seconds(rows, n_positions)
    per_token = max(many - one, 1e-9) / max(rows * n_positions - 1, 1)
    return one / per_token


def _run_variants(model: Model, task: PatchingTask, rows: list[tuple[int, int, int, int]], routes: list[_Route],
                  router: _Router, base: Tokens, past: PastKeys | None) -> torch.Tensor:
    """One forward for a batch of (layer, first position, cell, prompt) rows, each patched at its cell.

    The batch starts at its smallest layer and position: what lies before is the base run's.
    Without ``past`` it is a whole forward pass from the tokens.
    """
    layer, start = min(r[0] for r in rows), min(r[1] for r in rows)
    prompts = torch.tensor([r[3] for r in rows])
    by_patch: dict[tuple[str, str], list[tuple[int, _Route]]] = defaultdict(list)
    for row, (_, _, index, _) in enumerate(rows):
        by_patch[routes[index].site, routes[index].key].append((row, routes[index]))
    interventions = []
    for (site, key), entries in by_patch.items():
        info = model.site_table.info(site)
        patch = _suffix(router.sources[key][prompts], info, start)
        mask = torch.zeros(patch.shape, dtype=torch.bool)
        for row, route in entries:  # positions relative to the batch's first position
            region = list(route.region)
            region[info.pos_dim] = _shift(region[info.pos_dim], start)
            mask[(row, *region[1:])] = True

        def patch_fn(act: torch.Tensor, mask=mask, patch=patch) -> torch.Tensor:
            return torch.where(mask.to(act.device), patch.to(act), act)

        interventions.append(interp.Apply(site, patch_fn))
    tokens = base.take(prompts)
    if past is None:
        with model.intervene(*interventions):
            return task.metric(model(tokens)[:, -1], prompts)
    resid_site = model.site("resid_pre", layer)
    resid = _suffix(router.ref[resid_site][prompts], model.site_table.info(resid_site), start)
    last = model.cfg.n_layers - 1
    trim = router.trim_ok and not any(model.site_table.info(site).layer == last and model.site_table.info(site).kind in _MLP_KINDS
                                      for site, _ in by_patch)
    with model.intervene(*interventions), _last_position_mlp(model.mlp(last)) if trim else contextlib.nullcontext():
        logits = model.forward_from(layer, resid, tokens, last_only=True, past=past.take(prompts, start, layer) if start else None)
    return task.metric(logits[:, -1], prompts)


# Sites computed inside or after a block's MLP: a patch there needs the MLP at every position.
_MLP_KINDS = frozenset({"mlp_post", "mlp_out", "resid_post"})


@contextlib.contextmanager
def _last_position_mlp(mlp: nn.Module) -> Iterator[None]:
    """Run ``mlp`` on the last position only (its output is zero elsewhere).

    In the last block only the last position's output reaches the metric; other positions still
    matter there through their attention keys and values, which come before the MLP.
    """
    def first(_module: nn.Module, args: tuple) -> tuple:
        shapes.append(args[0].shape)
        return (args[0][:, -1:], *args[1:])

    def pad(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        full = out.new_zeros((*shapes.pop()[:-1], out.shape[-1]))
        full[:, -1:] = out
        return full

    shapes: list[torch.Size] = []
    handles = [mlp.register_forward_pre_hook(first), mlp.register_forward_hook(pad)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _shift(index, start: int):
    """A position index (an int or slice(None)) relative to a suffix starting at ``start``."""
    return index - start if isinstance(index, int) else index


def _suffix(act: torch.Tensor, info, start: int) -> torch.Tensor:
    """The positions ``start..`` of an activation."""
    index: list = [slice(None)] * act.ndim
    index[info.pos_dim] = slice(start, None)
    return act[tuple(index)]
