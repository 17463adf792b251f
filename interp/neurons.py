"""LM-head neuron decoding (Davies, arXiv 2501.02688) and neuron clamping during generation.

Every MLP neuron has input rows (the up projection, and the gate projection in gated MLPs) and
an output column (of the down projection). ``decode_neurons`` scores each such vector ``w``
against every token's unembedding row and keeps the top and bottom tokens:

- ``raw``:        W_U w
- ``final_gain``: W_U (g_final * w): what the unembedding reads of ``w`` after the final norm's
  gain (the natural reading of an output column, up to the norm's positive scale);
- ``input_gain``: W_U (g_ln * w), g_ln the gain of the norm in front of this MLP: the residual
  direction an input row reads, since the neuron sees g_ln * x / s(x).

Scores are dot products (logit contributions per unit of the vector). Memory stays bounded: the
vectors are decoded in chunks of ``chunk`` x vocabulary. Where the CPU multiplies bfloat16
natively, one bfloat16 matmul per direction yields a rigorous upper bound of every token's score
(see ``ScreenedUnembedding``), the best bounds are rescored exactly in float32, and any row whose
top k the bounds cannot settle is recomputed in float32: the tokens are float32's.

``clamp_effect`` sets one neuron's hidden activation (``blocks.L.mlp.hook_post``) to a value at
every position through ``interp.Clamp`` and measures the probability of a token, greedy
generation with and without the clamp.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from interp.errors import ArchitectureError, InputError
from interp.lens.readout import norm_info, unembedding, vocabulary
from interp.paths import atomic_write, resource_json, write_text

if TYPE_CHECKING:
    from interp.models.model import Model

WEIGHT_KINDS = ("gate", "up", "down")
VARIANTS = ("raw", "final_gain", "input_gain")


def neuron_weights(model: Model, layer: int) -> dict[str, torch.Tensor]:
    """Block ``layer``'s MLP vectors as [d_mlp, d_model] float32: ``up``, ``gate`` (gated MLPs) and ``down``."""
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"layer {layer} is out of range: {model.cfg.name} has layers 0..{model.cfg.n_layers - 1}")
    d, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    mlp = model.mlp(layer)
    if hasattr(mlp, "W_in"):  # TransformerLens: W_in [d, d_mlp], W_out [d_mlp, d]
        found = {"up": mlp.W_in.T, "down": mlp.W_out}
        if getattr(mlp, "W_gate", None) is not None:
            found["gate"] = mlp.W_gate.T
        return {k: v.detach().float().contiguous() for k, v in found.items()}
    out_path = model.arch.mlp_out_proj.removeprefix(model.arch.mlp + ".")
    out: dict[str, torch.Tensor] = {"down": _out_in(mlp.get_submodule(out_path)).T}
    for name, module in mlp.named_modules():
        if not name or name == out_path or not _is_linear(module):
            continue
        rows = _out_in(module)
        if rows.shape[1] != d:
            continue
        if rows.shape[0] == 2 * d_mlp:  # fused gate + up (Phi-3 order: gate first)
            out["gate"], out["up"] = rows[:d_mlp], rows[d_mlp:]
        elif rows.shape[0] == d_mlp:
            out["gate" if "gate" in name else "up"] = rows
    if "up" not in out or out["down"].shape != (d_mlp, d):
        raise ArchitectureError(f"{type(mlp).__name__}: expected input projections with {d_mlp} outputs and an output projection with {d_mlp} inputs")
    return {key: value.contiguous() for key, value in out.items()}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _out_in(module: nn.Module) -> torch.Tensor:
    """A linear map's weight as [out, in] float32 (GPT-2's Conv1D stores [in, out])."""
    weight = module.weight.detach().float()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def variant_gain(model: Model, layer: int, variant: str) -> torch.Tensor | None:
    """The gain vector a variant multiplies each neuron vector by (None for ``raw``)."""
    if variant not in VARIANTS:
        raise InputError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if variant == "raw":
        return None
    norm = model.final_norm if variant == "final_gain" else model.mlp_norm(layer)
    return norm_info(norm, model.cfg.d_model).gain


class ScreenedUnembedding:
    """Exact top-k / bottom-k of ``vectors @ W_U.T`` with the bulk of the work in bfloat16.

    For a direction sigma (+1: top, -1: bottom) and a vector y = sigma * w, the exact score splits
    as W.y = W_hi.y_hi + W_hi.dy + dW.y, with W_hi, y_hi the bfloat16 roundings and dW, dy the
    (exactly representable) remainders. One bfloat16 matmul of [y_hi, |y|, |dy|] against
    [W_hi, |dW_v|, |W_hi,v|] (norms rounded up) therefore yields, per token, an upper bound of
    sigma * score up to the matmul's own rounding: float32 accumulation of d + 2 terms and the
    bfloat16 output, bounded by ``upper`` below. The k' largest bounds are the candidates; their
    exact float32 scores give the k-th best score s_k, and if the (k'+1)-th largest bound (every
    other token's bound is at most that) stays below s_k, no token outside the candidates can
    enter the top k. Rows where that check fails (rare) are recomputed in float32.
    """

    INFLATE = 1 + 2**-7  # rounding a norm times this to bfloat16 never lands below the norm
    BLOCK = 64

    def __init__(self, W_U: torch.Tensor, *, extra: int = 16):
        self.W_U, self.extra = W_U, extra
        hi = W_U.bfloat16()
        self.dW = (W_U - hi.float()).norm(dim=1)
        self.hi_norm = hi.float().norm(dim=1)
        vocab, d = W_U.shape
        width = -(-(d + 2) // 16) * 16  # pad the inner dimension for the matrix units
        self.rows = -(-vocab // self.BLOCK) * self.BLOCK
        A = torch.zeros(self.rows, width, dtype=torch.bfloat16)
        A[:vocab, :d] = hi
        A[:vocab, d] = (self.dW * self.INFLATE).bfloat16()
        A[:vocab, d + 1] = (self.hi_norm * self.INFLATE).bfloat16()
        self.A, self.width, self.vocab, self.d = A, width, vocab, d
        self.norm_max = float(self.hi_norm.max()), float(self.dW.max())
        self.unsafe_rows = 0  # rows recomputed in float32 so far
        self._out: torch.Tensor | None = None  # reused matmul output (large fresh allocations are slow on CPU)

    def upper(self, f: torch.Tensor, s_bound: torch.Tensor) -> torch.Tensor:
        """A bound on sigma * score for every token whose matmul output is at most ``f``."""
        gamma = (self.d + 2) * 2**-24 / (1 - (self.d + 2) * 2**-24)
        return f + 2**-7 * f.abs() + gamma * s_bound

    def select(self, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        results = []
        for sign in (1.0, -1.0):
            values, ids = self._one_direction(sign * vectors, k)
            results += [sign * values, ids]
        return results[0], results[1], results[2], results[3]

    def _one_direction(self, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, d = y.shape
        y_hi = y.bfloat16()
        norm_y, norm_dy = y.norm(dim=1), (y - y_hi.float()).norm(dim=1)
        aug = torch.zeros(rows, self.width, dtype=torch.bfloat16)
        aug[:, :d] = y_hi
        aug[:, d] = (norm_y * self.INFLATE).bfloat16()
        aug[:, d + 1] = (norm_dy * self.INFLATE).bfloat16()
        if self._out is None or self._out.shape[0] < rows:
            self._out = torch.empty(rows, self.rows, dtype=torch.bfloat16)
        bounds = torch.mm(aug, self.A.T, out=self._out[:rows])  # [rows, padded vocab]
        bounds[:, self.vocab :] = float("-inf")
        wanted = min(k + self.extra, self.vocab - 1)
        # The `wanted + 1` blocks with the largest maxima hold the `wanted + 1` largest bounds.
        blocks = bounds.view(rows, -1, self.BLOCK).amax(-1)
        n_blocks = min(wanted + 1, blocks.shape[1])
        top_blocks = blocks.topk(n_blocks, dim=1)
        cols = (top_blocks.indices[:, :, None] * self.BLOCK + torch.arange(self.BLOCK)).reshape(rows, -1)
        picked = bounds.gather(1, cols).topk(min(wanted + 1, cols.shape[1]), dim=1)
        candidates = cols.gather(1, picked.indices[:, :wanted])
        outside = picked.values[:, wanted].float()
        if n_blocks < blocks.shape[1]:
            outside = torch.maximum(outside, top_blocks.values[:, -1].float())
        exact = torch.bmm(self.W_U.index_select(0, candidates.reshape(-1)).view(rows, wanted, d), y[:, :, None])[:, :, 0]
        best = exact.topk(k, dim=1)
        values, ids = best.values, candidates.gather(1, best.indices)
        hi_max, dw_max = self.norm_max
        s_bound = 1.01 * (hi_max * norm_y + dw_max * norm_y + hi_max * norm_dy) * self.INFLATE**2
        margin = 1e-5 * values[:, -1].abs() + 1e-6
        unsafe = self.upper(outside, s_bound) >= values[:, -1] - margin
        if bool(unsafe.any()):
            full = (y[unsafe] @ self.W_U.T).topk(k, dim=1)
            values[unsafe], ids[unsafe] = full.values, full.indices
        self.unsafe_rows += int(unsafe.sum())
        return values, ids


def top_and_bottom(W_U: torch.Tensor, vectors: torch.Tensor, k: int, *, screen: ScreenedUnembedding | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k and bottom-k of ``vectors @ W_U.T`` per row: (top values, top ids, bottom values, bottom ids).

    Plain float32, or through a ``ScreenedUnembedding`` (same tokens, mostly bfloat16 work).
    """
    if screen is not None:
        return screen.select(vectors, k)
    scores = vectors @ W_U.T
    top, bottom = scores.topk(k, dim=1), scores.topk(k, dim=1, largest=False)
    return top.values, top.indices, bottom.values, bottom.indices


def decode_neurons(
    model: Model,
    layers: Sequence[int] | None = None,
    *,
    weights: Sequence[str] | None = None,
    variant: str = "raw",
    k: int = 10,
    compute_dtype: str = "auto",
    chunk: int = 2048,
    progress: bool = True,
) -> pd.DataFrame:
    """Top and bottom ``k`` tokens of every neuron's vectors: one row per (layer, neuron, weight).

    Columns: layer, neuron, weight, variant, top_ids, top_tokens, top_scores, bottom_ids,
    bottom_tokens, bottom_scores.
    """
    from interp.lens.train import compute_dtype as resolve_dtype

    layers = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    if variant not in VARIANTS:
        raise InputError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    wanted = list(WEIGHT_KINDS) if weights is None else list(weights)
    unknown = [w for w in wanted if w not in WEIGHT_KINDS]
    if unknown:
        raise InputError(f"weights {unknown}: choose from {', '.join(WEIGHT_KINDS)}")
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise InputError(f"layer {layer} is out of range: {model.cfg.name} has layers 0..{model.cfg.n_layers - 1}")
    dtype = resolve_dtype(compute_dtype)
    W_U, _ = unembedding(model)
    k = min(k, W_U.shape[0])
    screen = ScreenedUnembedding(W_U) if dtype == torch.bfloat16 else None
    vocab = vocabulary(model)
    frames = []
    with torch.no_grad():
        for layer in tqdm(layers, desc="decode neurons", unit="layer", disable=not progress):
            gain = variant_gain(model, layer, variant)
            for kind, rows in neuron_weights(model, layer).items():
                if kind not in wanted:
                    continue
                vectors = rows if gain is None else rows * gain
                parts = [top_and_bottom(W_U, vectors[s : s + chunk], k, screen=screen)
                         for s in range(0, len(vectors), chunk)]
                top_v, top_i, bot_v, bot_i = (torch.cat(x).numpy() for x in zip(*parts, strict=True))
                frames.append(pd.DataFrame({
                    "layer": layer, "neuron": np.arange(len(vectors)), "weight": kind, "variant": variant,
                    "top_ids": list(top_i), "top_tokens": list(vocab[top_i]), "top_scores": list(top_v),
                    "bottom_ids": list(bot_i), "bottom_tokens": list(vocab[bot_i]), "bottom_scores": list(bot_v),
                }))
    if not frames:
        raise InputError(f"{model.cfg.name} has none of the weights {wanted} (it has {', '.join(neuron_weights(model, layers[0]))})")
    return pd.concat(frames, ignore_index=True)


def write_neuron_table(table: pd.DataFrame, folder: str | Path, *, title: str = "LM-head neuron decoding", html_tokens: int = 5) -> tuple[Path, Path]:
    """``neurons.parquet`` (every column) and ``neurons.html`` (a searchable static table) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parquet = folder / "neurons.parquet"
    atomic_write(parquet, lambda tmp: table.to_parquet(tmp, index=False))
    # The page embeds one list of token texts and, per row, indices into it (compact for 100k+ rows).
    lookup: dict[int, str] = {}
    for col_ids, col_tokens in (("top_ids", "top_tokens"), ("bottom_ids", "bottom_tokens")):
        for row_ids, row_tokens in zip(table[col_ids], table[col_tokens], strict=True):
            lookup.update(zip((int(i) for i in row_ids[:html_tokens]), row_tokens[:html_tokens], strict=True))
    index = {token: n for n, token in enumerate(lookup)}
    data = {
        "tokens": list(lookup.values()),
        "rows": [[int(r.layer), int(r.neuron), r.weight, [index[int(i)] for i in r.top_ids[:html_tokens]],
                  [index[int(i)] for i in r.bottom_ids[:html_tokens]]] for r in table.itertuples()],
    }
    page = folder / "neurons.html"
    write_text(page, _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", json.dumps(data, separators=(",", ":"))))
    return parquet, page


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>body{font-family:system-ui,sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}
.tok{font-family:ui-monospace,monospace;background:#eef;margin-right:4px;white-space:pre}.neg{background:#fee}</style></head>
<body><h1>__TITLE__</h1><p>Search a token (exact text, e.g. <code> dog</code>), or <code>L12</code>, <code>L12 N345</code>;
<label><input type="checkbox" id="bottom"> search bottom tokens too</label></p>
<input id="q" size="40" autofocus> <span id="count"></span>
<table><thead><tr><th>layer</th><th>neuron</th><th>weight</th><th>top tokens</th><th>bottom tokens</th></tr></thead><tbody id="out"></tbody></table>
<script>
const D=__DATA__;const out=document.getElementById('out');
function esc(s){return s.replace(/&/g,'&amp;').replace(/</g,'&lt;')}
function toks(ix,cls){return ix.map(i=>'<span class="tok '+cls+'">'+esc(JSON.stringify(D.tokens[i]).slice(1,-1))+'</span>').join('')}
function show(){const q=document.getElementById('q').value;const both=document.getElementById('bottom').checked;
 const m=q.trim().match(/^L(\\d+)(?:\\s+N(\\d+))?$/i);const hits=[];
 for(const r of D.rows){let ok;
  if(m){ok=r[0]==+m[1]&&(m[2]===undefined||r[1]==+m[2])}
  else if(q===''){ok=true}
  else{ok=r[3].some(i=>D.tokens[i]===q)||(both&&r[4].some(i=>D.tokens[i]===q))}
  if(ok){hits.push(r);if(hits.length>=500)break}}
 document.getElementById('count').textContent=hits.length+(hits.length>=500?'+':'')+' rows';
 out.innerHTML=hits.map(r=>'<tr><td>'+r[0]+'</td><td>'+r[1]+'</td><td>'+r[2]+'</td><td>'+toks(r[3],'')+'</td><td>'+toks(r[4],'neg')+'</td></tr>').join('')}
document.getElementById('q').oninput=show;document.getElementById('bottom').onchange=show;show();
</script></body></html>"""


def default_prompts(split: str = "test") -> list[str]:
    """Open-ended prompts from ``data/prompts.json``: ``dev`` for choosing, ``test`` for reporting."""
    prompts = resource_json("prompts.json")
    if split not in ("dev", "test"):
        raise InputError(f"split {split!r}: choose dev or test")
    return list(prompts[split])


def corpus_max_activation(model: Model, layer: int, neuron: int, *, corpus: str = "shakespeare", contexts: int = 16,
                          seed: int = 0) -> float:
    """A neuron's largest activation over ``contexts`` x 128 tokens of a corpus (a scale for clamp values)."""
    from interp.data import load_corpus, token_contexts

    chosen = token_contexts(load_corpus(corpus), model.tokenizer, context_len=128, n_contexts=contexts, seed=seed)
    ids = torch.from_numpy(chosen.tokens).long()
    return float(max(max_activations(model, layer, part)[neuron] for part in ids.split(8)))


def neuron_site(model: Model, layer: int) -> str:
    """The site holding block ``layer``'s MLP neurons (the input of the down projection)."""
    return model.site("mlp_post", layer)


def max_activations(model: Model, layer: int, inputs: object) -> torch.Tensor:
    """Each neuron's largest activation over the real tokens of ``inputs`` ([d_mlp], float32)."""
    batch = model.tokenize(inputs)
    acts = model.run_with_cache(batch, neuron_site(model, layer))[neuron_site(model, layer)].float()
    return acts.masked_fill(~batch.real()[..., None], float("-inf")).amax(dim=(0, 1))


@dataclass
class ClampResult:
    """Effect of clamping one neuron during greedy generation on one token's probability.

    ``p_clean``: mean p(token) over every generated step of the unclamped run; ``p_clamped``:
    the same contexts (the unclamped text) read with the neuron clamped; ``p_clamped_own``:
    along the clamped run's own generation. ``count_*``: how often the token was generated.
    """

    layer: int
    neuron: int
    value: float
    token: str
    token_id: int
    p_clean: float
    p_clamped: float
    p_clamped_own: float
    count_clean: int
    count_clamped: int
    generations: pd.DataFrame

    @property
    def ratio(self) -> float:
        return self.p_clamped / self.p_clean if self.p_clean > 0 else float("inf")

    def summary(self) -> dict[str, object]:
        keys = ("layer", "neuron", "value", "token", "p_clean", "p_clamped", "p_clamped_own", "count_clean", "count_clamped")
        return {**{k: getattr(self, k) for k in keys}, "ratio": self.ratio}


@dataclass
class GreedyRun:
    """Greedy continuations of prompts (prompt + new ids each) and every step's next-token distribution."""

    prompts: list[str]
    ids: list[torch.Tensor]
    probs: list[torch.Tensor]  # [steps, vocab] per prompt
    steps: int


def greedy_run(model: Model, prompts: Sequence[str], steps: int, interventions: Sequence = ()) -> GreedyRun:
    """Greedy generation, one length group of prompts at a time (no padding shifts positions)."""
    if not prompts:
        raise InputError("need at least one prompt")
    encoded = [model.tokenize(p).ids[0] for p in prompts]
    ids_out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    probs_out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    with torch.no_grad(), model.intervene(*interventions):
        for members in groups.values():
            ids = torch.stack([encoded[i] for i in members])
            probs = []
            for _ in range(steps):
                p = model(ids)[:, -1].float().softmax(-1)
                probs.append(p)
                ids = torch.cat([ids, p.argmax(-1, keepdim=True)], dim=1)
            stacked = torch.stack(probs, dim=1)
            for row, i in enumerate(members):
                ids_out[i], probs_out[i] = ids[row], stacked[row]
    return GreedyRun(list(prompts), ids_out, probs_out, steps)


def clamp_effect(model: Model, layer: int, neuron: int, value: float, prompts: Sequence[str], *,
                 token: str | int | None = None, max_new_tokens: int = 24, baseline: GreedyRun | None = None) -> ClampResult:
    """Clamp neuron ``(layer, neuron)`` to ``value`` at every position and measure ``token``.

    ``token`` defaults to the top token of the neuron's output column decoded with the final
    norm's gain (what the neuron writes towards). Generation is greedy. ``baseline``: the
    unclamped ``greedy_run`` of the same prompts and length, reused across neurons.
    """
    from interp.intervene import Clamp
    from interp.lens.logit import token_ids

    if not 0 <= neuron < model.cfg.d_mlp:
        raise InputError(f"neuron {neuron} is out of range: the MLP has neurons 0..{model.cfg.d_mlp - 1}")
    site = neuron_site(model, layer)  # validates the layer
    if token is None:
        down = neuron_weights(model, layer)["down"][neuron] * variant_gain(model, layer, "final_gain")
        W_U, _ = unembedding(model)
        target = int((W_U @ down).argmax())
    else:
        target = token_ids(model, token)[0]
    clamp = Clamp(site, unit=neuron, value=float(value))
    clean = baseline if baseline is not None else greedy_run(model, prompts, max_new_tokens)
    if clean.prompts != list(prompts) or clean.steps != max_new_tokens:
        raise InputError("the baseline run was made for other prompts or another length")
    own = greedy_run(model, prompts, max_new_tokens, [clamp])
    forced = []
    with torch.no_grad(), model.intervene(clamp):
        for ids in clean.ids:  # the unclamped text, read with the clamp: same contexts, only the neuron differs
            logits = model(ids[None, :-1])[0, -max_new_tokens:]
            forced.append(logits.float().softmax(-1)[:, target])
    starts = [len(ids) - max_new_tokens for ids in clean.ids]
    pairs = list(zip(clean.ids, own.ids, starts, strict=True))
    generations = pd.DataFrame({"prompt": list(prompts), "clean": [model.to_string(c[n:]) for c, _, n in pairs],
                                "clamped": [model.to_string(o[n:]) for _, o, n in pairs]})
    return ClampResult(
        layer=layer, neuron=neuron, value=float(value), token=model.to_string([target]), token_id=target,
        p_clean=float(torch.cat([p[:, target] for p in clean.probs]).mean()), p_clamped=float(torch.cat(forced).mean()),
        p_clamped_own=float(torch.cat([p[:, target] for p in own.probs]).mean()),
        count_clean=sum(int((c[n:] == target).sum()) for c, _, n in pairs),
        count_clamped=sum(int((o[n:] == target).sum()) for _, o, n in pairs),
        generations=generations,
    )
