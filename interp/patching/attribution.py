"""Attribution patching and relevance patching (RelP): one forward and one backward for every cell.

The effect of patching a cell is estimated to first order: (a_source - a_base) . dM/da, with the
gradient taken on the base run (the corrupt prompts when denoising). Attribution patching uses
the ordinary gradient; RelP takes it through LRP rules (``rules.py``), which keeps the forward
pass exactly as it is and replaces the backward pass of norms, activations, gated products and
(optionally) attention patterns by their relevance-propagation rules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

import interp
from interp.errors import InputError
from interp.patching.activation import DEFAULT_KINDS, Cell, cell_region, cell_table, plan
from interp.patching.result import PatchingResult
from interp.patching.rules import Rules, relevance_rules

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.patching.tasks import PatchingTask


def attribution_patching(
    model: Model,
    task: PatchingTask,
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    rules: Rules | None = None,
    direction: str = "denoising",
    per_position: bool = True,
    heads: bool = False,
    cells: Sequence[Cell] | None = None,
) -> PatchingResult:
    """First-order patching estimates for every cell; ``rules`` turns attribution patching into RelP."""
    start = time.perf_counter()
    base, source, cells = plan(model, task, direction, kinds, cells, per_position=per_position, heads=heads)
    sites = list(dict.fromkeys(c.site for c in cells))
    with torch.no_grad():
        src = model.run_with_cache(source, sites)
    acts, grads = gradients_at(model, task, base, sites, rules)
    estimates = []
    base_value = task.corrupt_value if direction == "denoising" else task.clean_value
    contributions = {site: (src[site] - acts[site]) * grads[site] for site in sites}
    for cell in cells:
        estimates.append(float(contributions[cell.site][cell_region(cell, model.site_table.info(cell.site))].sum()))
    table = cell_table(model, task, cells, [base_value + e for e in estimates])
    method = "attribution" if rules is None else "relp"
    return PatchingResult(method, direction, task.name, table, task.position_labels(model), task.clean_value,
                          task.corrupt_value, time.perf_counter() - start)


def gradients_at(model: Model, task: PatchingTask, tokens: interp.Tokens, sites: list[str], rules: Rules | None,
                 *, allow_cut: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Activations and d(mean metric)/d(activation) at ``sites`` on ``tokens`` (parameters get no gradient).

    A hook point may fire more than once per forward (TransformerLens runs ``ln1`` once each for
    the query, key and value inputs): every call gets a node of its own, and the site's gradient
    is the sum over its calls, which is the gradient of the one activation they all read.
    ``allow_cut``: a site no gradient reaches gets zeros (for callers that cut the graph on purpose)."""
    captured: dict[str, list[torch.Tensor]] = {}
    values: dict[str, torch.Tensor] = {}  # for sites the model later changes in place: their value when read

    def leaf(act: torch.Tensor) -> torch.Tensor:  # gradients start at the embeddings; weights stay frozen
        return act.detach().requires_grad_()

    def capture(site: str):
        def fn(act: torch.Tensor) -> torch.Tensor:
            if act.requires_grad:
                fresh = act.clone()  # a node of our own, so the gradient reaching it can be read
                fresh.retain_grad()
            else:  # nothing upstream needs a gradient (position embeddings; a pattern held constant)
                fresh = act.detach().clone().requires_grad_()
            calls = captured.setdefault(site, [])
            if calls and not torch.equal(calls[0].detach(), fresh.detach()):
                raise InputError(f"site {site} fired twice in one forward with different values; its gradient is ambiguous")
            calls.append(fresh)
            if model.site_table.hook(site).mutable and len(calls) == 1:
                values[site] = fresh.detach().clone()
            return fresh

        return fn

    frozen = [p for p in model.module.parameters() if p.requires_grad]
    embed = "hook_embed"
    interventions = [interp.Apply(embed, leaf)] + [interp.Apply(s, capture(s)) for s in sites]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad(), model.intervene(*interventions), (relevance_rules(model, rules) if rules else contextlib.nullcontext()):
            logits = model(tokens)
            prompts = torch.arange(tokens.ids.shape[0], device=logits.device)
            task.metric(logits[:, -1], prompts).mean().backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    missing = [s for s in sites if s not in captured]
    if missing:
        raise InputError(f"the forward pass never reached site(s) {', '.join(missing)}, so they have no gradient")
    # The metric reads every captured tensor in a connected model; no gradient means something cut the graph.
    cut = [s for s, calls in captured.items() if all(t.grad is None for t in calls)]
    if cut and allow_cut:
        return ({s: values.get(s, calls[0].detach()) for s, calls in captured.items()},
                {s: sum((t.grad.detach() for t in calls if t.grad is not None), torch.zeros_like(calls[0]))
                 for s, calls in captured.items()})
    if cut:
        raise InputError(f"no gradient reached site(s) {', '.join(cut)}: the graph from there to the metric is cut "
                         "(a hook detached it, or a rule holds something between it and the metric constant, as the attention rule does "
                         "for queries and keys), so attribution there cannot be computed")
    grads = {s: sum(t.grad.detach() for t in calls if t.grad is not None) for s, calls in captured.items()}
    return {s: values.get(s, calls[0].detach()) for s, calls in captured.items()}, grads

