"""AtP* (Kramar et al. 2024, arXiv 2403.00745): attribution patching with the QK fix, and optionally GradDrop.

Attribution patching linearises the whole model. Where a patch changes the queries or keys of an
attention layer whose softmax is saturated, the linear estimate of the pattern change is far off
(the gradient of a saturated softmax is near zero however much the scores move). The QK fix
computes that one change exactly: for the first attention layer that reads the patched residual
stream (layer L for ``resid_pre`` L; L + 1 for ``attn_out``, ``mlp_out``, ``resid_mid`` and
``resid_post`` L), it recomputes the queries and keys from the patched residual, takes the softmax
of the new scores, and multiplies the change of the pattern by the gradient of the metric with
respect to the pattern. The estimate is then

    attribution estimate - (linear estimate through that layer's queries and keys) + QK fix,

where the linear estimate through queries and keys is (q' - q) . dM/dq + (k' - k) . dM/dk, the
attribution estimate of patching the queries and keys themselves. Everything downstream of the
pattern stays linear. A cell at one position changes one query row (all its keys) and one key
column (every later query) of each head; both are computed in closed form from the base scores,
so the fix costs one call of each reading block up to its attention kernel, with the components it
reads stacked along the batch (none for ``resid_pre``, whose patched residual is the source run's
own: its queries and keys are read off that run), plus O(heads x positions^2) arithmetic per cell.
No pattern is materialised in the model's runs: attention taps read queries, keys and values beside
the model's own kernel, and dM/dpattern is dM/dz @ values^T (z: the heads' outputs).
Cells of other kinds (heads' ``z``, MLP hidden, norms) get the attribution estimate.

GradDrop (``grad_drop=True``) is the paper's second fix, against cancellation: one more backward
pass per layer, each with the gradient through that layer's attention and MLP outputs set to zero;
the estimate is the mean over layers of the absolute QK-fixed estimate (a magnitude, for finding
components that matter; it has no sign). It costs n_layers extra backward passes.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

import interp
from interp.errors import InputError
from interp.models.hooks import AttentionInputs, StopForward, replace_hidden_input, tap_attention
from interp.patching.activation import DEFAULT_KINDS, Cell, cell_region, cell_table, plan
from interp.patching.attribution import gradients_at
from interp.patching.result import PatchingResult
from interp.patching.rules import Rules

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.patching.tasks import PatchingTask

# Kinds that add to the residual stream: (layer offset of the first attention that reads them).
_READER_OFFSET = {"resid_pre": 0, "resid_mid": 1, "attn_out": 1, "mlp_out": 1, "resid_post": 1}
_LAYERS_AT_ONCE = 6  # reading layers whose QK fixes are computed in one stacked pass


def atp_star(
    model: Model,
    task: PatchingTask,
    kinds: Sequence[str] = DEFAULT_KINDS,
    *,
    direction: str = "denoising",
    per_position: bool = True,
    heads: bool = False,
    cells: Sequence[Cell] | None = None,
    grad_drop: bool = False,
    rules: Rules | None = None,
) -> PatchingResult:
    """AtP* estimates for every cell: attribution patching with the QK fix (and GradDrop if asked).

    ``rules``: take the gradients through RelP's rules (RelP with the QK fix).
    """
    start = time.perf_counter()
    if model.cfg.backend == "transformer_lens" or not model.arch.pattern:
        raise InputError(f"AtP* recomputes attention patterns from queries and keys, which interp reaches only for HF "
                         f"models whose attention runs through transformers' attention interface; not {model.cfg.name}")
    base, source, cells = plan(model, task, direction, kinds, cells, per_position=per_position, heads=heads)
    sites = list(dict.fromkeys(c.site for c in cells))
    readers = _readers(model, sites)
    reading_layers = sorted(set(readers.values()))
    resid_sites = [model.site("resid_pre", r) for r in reading_layers]
    z_sites = [model.site("z", r) for r in reading_layers]  # dM/dpattern = dM/dz . values
    # A resid_pre cell's patched residual is the source run's own, so where both runs share their
    # positions and mask, its reading layer's queries and keys are read off the source run. (Other
    # cells call the reading block with the base run's arguments: they hold masks and positions, which
    # depend on the mask and shape, not on the token ids.)
    same_layout = base.mask is None and source.mask is None or (
        base.mask is not None and source.mask is not None and torch.equal(base.mask, source.mask))
    direct = [s for s in readers if same_layout and model.site_table.info(s).kind == "resid_pre"]
    src_qk: dict[int, dict[str, Any]] = {}
    with torch.no_grad(), _capture_qk(model, sorted({readers[s] for s in direct}), src_qk):
        src = model.run_with_cache(source, sites)
    drops = [None] + (list(range(model.cfg.n_layers)) if grad_drop else [])
    runs = []
    for dropped in drops:
        qk: dict[int, dict[str, Any]] = {}
        with _capture_qk(model, reading_layers, qk), _drop_gradient(model, dropped):
            acts, grads = gradients_at(model, task, base, list(dict.fromkeys(sites + resid_sites + z_sites)), rules,
                                           allow_cut=dropped is not None or model.active_interventions > 0)
        runs.append((acts, grads, qk))
    acts, _, qk = runs[0]
    # (run_with_cache may stop before a reading layer's attention when no later site is asked for)
    patched = {s: src_qk[readers[s]] for s in direct if "q" in src_qk.get(readers[s], {})}
    patched.update(_patched_qk(model, {s: layer for s, layer in readers.items() if s not in patched}, acts, src, qk))
    by_layer: dict[int, list[str]] = defaultdict(list)
    for site, layer in readers.items():
        by_layer[layer].append(site)
    whole = {cell.site for cell in cells if cell.position is None}  # sites with an all-positions cell

    # Layers whose fixes have the same shape and score transform are computed together, a few at a time
    # (the fix is many small tensor operations; stacking layers shares their cost).
    chunks: dict[tuple, list[list[int]]] = defaultdict(lambda: [[]])
    for layer, layer_sites in by_layer.items():
        key = (len(layer_sites), qk[layer]["score_key"], bool(whole & set(layer_sites)))
        if len(chunks[key][-1]) == _LAYERS_AT_ONCE:
            chunks[key].append([])
        chunks[key][-1].append(layer)
    estimates = []  # per run, per cell
    for acts_d, grads, qk_d in runs:
        fixes = {}  # site -> (exact minus linear effect through queries and keys: per position, all positions)
        for (_, _, every_position), groups in chunks.items():
            for layers in groups:
                results = _qk_fix([qk_d[layer] for layer in layers], [[patched[s] for s in by_layer[layer]] for layer in layers],
                                  [_pattern_gradient(qk_d[layer], grads[model.site("z", layer)]) for layer in layers],
                                  every_position=every_position)
                for layer, layer_fixes in zip(layers, results, strict=True):
                    for site, fix in zip(by_layer[layer], layer_fixes, strict=True):
                        fixes[site] = ((fix["each"] - fix["linear each"]).tolist(),
                                       float(fix["all"] - fix["linear all"]) if "all" in fix else None)
        contributions = {site: (src[site] - acts_d[site]) * grads[site] for site in sites}
        run_estimates = []
        for cell in cells:
            value = float(contributions[cell.site][cell_region(cell, model.site_table.info(cell.site))].sum())
            if cell.site in fixes and cell.head is None:
                each, everywhere = fixes[cell.site]
                value += everywhere if cell.position is None else each[cell.position]
            run_estimates.append(value)
        estimates.append(run_estimates)
    final = estimates[0] if not grad_drop else torch.tensor(estimates[1:], dtype=torch.float64).abs().mean(0).tolist()
    base_value = task.corrupt_value if direction == "denoising" else task.clean_value
    table = cell_table(model, task, cells, [base_value + float(e) for e in final])
    method = ("atp*" if rules is None else "relp+qk") + ("+graddrop" if grad_drop else "")
    return PatchingResult(method, direction, task.name, table,
                          task.position_labels(model), task.clean_value, task.corrupt_value, time.perf_counter() - start)


def _readers(model: Model, sites: list[str]) -> dict[str, int]:
    """site -> the first attention layer reading its change, for sites that write the residual stream."""
    out = {}
    for site in sites:
        info = model.site_table.info(site)
        if info.kind in _READER_OFFSET and info.layer is not None and info.layer + _READER_OFFSET[info.kind] < model.cfg.n_layers:
            out[site] = info.layer + _READER_OFFSET[info.kind]
    return out


@contextlib.contextmanager
def _capture_qk(model: Model, layers: list[int], into: dict[int, dict[str, Any]]):
    """Keep the queries and keys (with their gradients), values, and score functions of ``layers``'
    attention, and the arguments their blocks were called with."""

    def tap(layer: int):
        def fn(inputs: AttentionInputs) -> None:
            for t in (inputs.query, inputs.key):
                if t.requires_grad:
                    t.retain_grad()
            into[layer].update(q=inputs.query, k=inputs.key, v=inputs.value.detach(), transform=inputs.transform,
                               masked=inputs.masked, score_key=(inputs.scale, inputs.softcap))

        return fn

    def block_inputs(layer: int):
        def fn(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            into.setdefault(layer, {})["block inputs"] = (args, kwargs)

        return fn

    blocks = model.module.get_submodule(model.arch.layers)
    handles = [tap_attention(_attention(model, layer), model.module.config, tap(layer)) for layer in layers]
    handles += [blocks[layer].register_forward_pre_hook(block_inputs(layer), with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pattern_gradient(base: dict[str, Any], grad_z: torch.Tensor) -> torch.Tensor:
    """dM/d(pattern) [batch, head, query, key] from dM/dz [batch, position, head, head_dim]: the heads'
    outputs are pattern @ values, so no pattern has to be materialised in the gradient run."""
    by_kv, by_head = _head_groups(base["q"], base["v"])
    return by_head(by_kv(grad_z.transpose(1, 2).to(base["v"].dtype)) @ base["v"].transpose(-1, -2))


def _head_groups(q: torch.Tensor, k: torch.Tensor):
    """Grouped-query attention without repeating keys: ``by_kv`` views queries [..., n, heads, p, d] as
    [..., n, kv_heads, group x p, d] (the heads sharing a key head are consecutive), so that they meet
    their keys [..., n, kv_heads, p, d] in one product; ``by_head`` views its result back as
    [..., n, heads, p, p]."""
    n, heads, p, d = q.shape
    kv = k.shape[-3]

    def by_kv(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-4], n, kv, heads // kv * p, d)

    def by_head(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-4], n, heads, p, t.shape[-1])

    return by_kv, by_head


def _attention(model: Model, layer: int) -> torch.nn.Module:
    return model.module.get_submodule(model.arch.layers)[layer].get_submodule(model.arch.attn)


@contextlib.contextmanager
def _drop_gradient(model: Model, layer: int | None):
    """GradDrop: no gradient through the attention and MLP outputs of ``layer`` (values unchanged)."""
    if layer is None:
        yield
        return
    cut = [interp.Apply(model.site(kind, layer), lambda a: a.detach()) for kind in ("attn_out", "mlp_out")]
    with model.intervene(*cut):
        yield


def _patched_qk(model: Model, readers: dict[str, int], acts, src, qk) -> dict[str, dict[str, torch.Tensor]]:
    """site -> queries and keys of its reading layer when the residual there carries the site's change.

    Queries and keys are position-local functions of the residual stream, so one call of the
    reading block (with the arguments of the base run, stopped at its attention scores) on the
    residual with every position changed gives the changed query and key at each position. The
    sites a layer reads are stacked along the batch: one call per layer.
    """
    blocks = model.module.get_submodule(model.arch.layers)
    by_layer: dict[int, list[str]] = defaultdict(list)
    for site, layer in readers.items():
        by_layer[layer].append(site)
    out = {}
    with torch.no_grad():
        for layer, layer_sites in by_layer.items():
            resid = acts[model.site("resid_pre", layer)]
            n = resid.shape[0]
            changed = torch.cat([resid + (src[site] - acts[site]).to(resid.dtype) for site in layer_sites])
            seen: dict[str, torch.Tensor] = {}

            def stop(inputs: AttentionInputs, seen=seen):
                seen["q"], seen["k"] = inputs.query, inputs.key
                raise StopForward

            args, kwargs = replace_hidden_input(*_repeat_batch(*qk[layer]["block inputs"], n, len(layer_sites)), changed)
            handle = tap_attention(_attention(model, layer), model.module.config, stop)
            try:
                blocks[layer](*args, **kwargs)
            except StopForward:
                pass
            finally:
                handle.remove()
            if "q" not in seen:
                raise InputError(f"AtP*: the attention of layer {layer} was not reached from its residual stream")
            for i, site in enumerate(layer_sites):
                out[site] = {"q": seen["q"][i * n:(i + 1) * n], "k": seen["k"][i * n:(i + 1) * n]}
    return out


def _repeat_batch(args: tuple, kwargs: dict, n: int, times: int) -> tuple[tuple, dict]:
    """A block call's arguments for ``times`` copies of its batch of ``n`` stacked along the batch: every
    per-prompt tensor (mask, positions, rotary tables: at least 2-D with ``n`` rows) repeated; tensors
    shared by the batch (one row, or 1-D like cache positions) kept."""

    def repeat(value):
        if isinstance(value, torch.Tensor) and n > 1 and value.dim() >= 2 and value.shape[0] == n:
            return value.repeat(times, *[1] * (value.dim() - 1))
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    return tuple(repeat(a) for a in args), {key: repeat(v) for key, v in kwargs.items()}


def _exp_rows(scores: torch.Tensor, blocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(scores - row max) with blocked entries exactly 0, and the row max. A blocked score is never
    exponentiated: exp of a huge negative number takes a slow path on CPUs (10-30x here)."""
    top = scores.amax(-1, keepdim=True)
    return (scores - top).masked_fill_(blocked, 0.0).exp_().masked_fill_(blocked, 0.0), top


def _softmax(scores: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    e, _ = _exp_rows(scores, blocked)
    return e.div_(e.sum(-1, keepdim=True))


def _qk_fix(bases: list[dict[str, Any]], news: list[list[dict[str, torch.Tensor]]], grad_patterns: list[torch.Tensor],
            every_position: bool = True) -> list[list[dict[str, torch.Tensor]]]:
    """Per layer of ``bases`` (its captured queries, keys and score functions), for each of its changed
    queries and keys in ``news`` (the same number per layer): the effect on the metric, summed over
    prompts and heads, through the exact change of the pattern ("each": [positions], for a change at
    one position; "all": for a change at every position), and as attribution patching estimates it
    ("linear each", "linear all"; "all" only with ``every_position``). The layers must share their
    score transform; they are stacked along the batch (layer-major), their changes in front."""
    # The model's own precision, at least float32 (float64 instead changed no estimate of the embedded IOI
    # sweep by more than 5e-7, at 1.4x the time).
    dtype = torch.promote_types(bases[0]["q"].dtype, torch.float32)
    layers, n = len(bases), bases[0]["q"].shape[0]

    def grad(t: torch.Tensor) -> torch.Tensor:
        return t.grad.to(dtype) if t.grad is not None else torch.zeros(t.shape, dtype=dtype)

    q, k = (torch.cat([b[name].detach() for b in bases]).to(dtype) for name in ("q", "k"))  # [layers x n, (kv_)heads, p, d]
    dq, dk = torch.cat([grad(b["q"]) for b in bases]), torch.cat([grad(b["k"]) for b in bases])
    q2, k2 = (torch.cat([torch.stack([c[name] for c in changes], 0) for changes in news], 1).to(dtype)
              for name in ("q", "k"))  # [sites, layers x n, (kv_)heads, p, d]
    # The linear estimate, on the keys as the kernel got them (a shared key's gradient is the sum over its heads).
    linear_each = ((q2 - q) * dq).sum((-1, -3)) + ((k2 - k) * dk).sum((-1, -3))  # [sites, layers x n, positions]
    by_kv, by_head = _head_groups(q, k)
    transform = bases[0]["transform"]
    transformed = transform(by_head(by_kv(q) @ k.transpose(-1, -2)))
    scores = torch.cat([b["masked"](part) for b, part in zip(bases, transformed.split(n), strict=True)])  # what the softmax read
    blocked = scores <= torch.finfo(bases[0]["q"].dtype).min / 2
    blocked &= ~blocked.all(-1, keepdim=True)  # all keys blocked: uniform as in eager (sdpa: 0; dM/dA is 0 there)
    e, row_max = _exp_rows(scores, blocked)
    total = e.sum(-1, keepdim=True)
    pattern = e / total
    g = torch.cat(grad_patterns).to(dtype)

    def rescored(dots_new: torch.Tensor) -> torch.Tensor:
        return torch.where(blocked, scores, scores + transform(dots_new) - transformed)

    # The query at p changes row p (with the key at p changed too, on the diagonal).
    row_dots = by_head(by_kv(q2) @ k.transpose(-1, -2))
    own_key = (by_kv(q2).unflatten(-2, (-1, k.shape[-2])) * k2.unsqueeze(-3)).sum(-1).flatten(-3, -2)  # q2_p . k2_p
    row_dots.diagonal(dim1=-2, dim2=-1).copy_(own_key)
    row = (g * (_softmax(rescored(row_dots), blocked) - pattern)).sum(-1)  # [sites, layers x n, h, p]

    # The key at p changes column p of every other row t: closed form from row t's log-partition.
    # [sites, layers x n, h, t, p]: row t's score for key p when k_p changes (a blocked key stays blocked: zeroed below)
    new_column = rescored(by_head(by_kv(q) @ k2.transpose(-1, -2))).masked_fill_(blocked, 0.0)
    lse = row_max + total.log()
    top = scores.argmax(-1, keepdim=True)
    without_top = row_max + e.scatter(-1, top, 0.0).sum(-1, keepdim=True).log()
    lse_without = lse + torch.log1p(-pattern.clamp(max=0.5))  # log sum_{j != p} exp(s_tj); exact where p is not the top key
    lse_without = lse_without.scatter(-1, top, without_top)
    lse_new = torch.logaddexp(lse_without, new_column)
    shrink = torch.expm1(lse - lse_new)  # factor by which every other entry of row t changes, minus one
    weighted = g * pattern
    column = shrink * (weighted.sum(-1, keepdim=True) - weighted) + g * ((new_column - lse_new).exp_() - pattern)
    column.masked_fill_(blocked, 0.0)
    column.diagonal(dim1=-2, dim2=-1).zero_()  # row p is counted in ``row``
    # [sites, layers x n, ...] -> [sites, layers, n, ...], summed over prompts (and heads)
    each = (row + column.sum(-2)).unflatten(1, (layers, n)).sum((2, 3))  # [sites, layers, p]
    linear = linear_each.unflatten(1, (layers, n)).sum(2)
    fixes = [[{"each": each[i, j], "linear each": linear[i, j], "linear all": linear[i, j].sum()} for i in range(len(news[j]))]
             for j in range(layers)]
    if every_position:
        changed = _softmax(rescored(by_head(by_kv(q2) @ k2.transpose(-1, -2))), blocked)
        everything = (g * (changed - pattern)).unflatten(1, (layers, n)).flatten(2).sum(2)  # [sites, layers]
        for j in range(layers):
            for i, fix in enumerate(fixes[j]):
                fix["all"] = everything[i, j]
    return fixes
