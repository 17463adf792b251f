"""Direct logit attribution: which components wrote a logit (difference) at a position.

The last residual stream is a sum: the embeddings, every attention head's output (its slice of
``attn.hook_z`` through the output projection), each attention output bias, and each MLP
output. The readout is linear in that sum once the final norm's scale is held at its value in
this run (``s(x_final)``), so each component c contributes

    gain * center(c) / s(x_final) . (W_U[answer] - W_U[wrong])

plus constant terms for the final norm's bias and the unembedding bias. The contributions add up
to the logit difference exactly, up to float rounding (reported as ``residual``); what is
approximate is the reading: holding the scale fixed ignores that removing a component would also
change the norm. Before attributing, the decomposition is checked on the run itself (heads +
bias = attention output; embeddings + all block outputs = last residual), so an architecture
whose blocks do not add their outputs to the residual stream is refused, not misread.

With a dictionary (SAE or transcoder) whose output site is an attention or MLP output, that
component is further split into latents, the decoder bias and the reconstruction error, which
add up to the component's contribution. A dictionary on a residual site splits that layer's
residual stream the same way (its direct path to the logits only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from interp.errors import ArchitectureError, InputError
from interp.lens.logit import token_ids
from interp.lens.readout import Readout
from interp.lens.translators import final_site

if TYPE_CHECKING:
    from interp.dictionary.sae import SparseDictionary
    from interp.models.model import Model, TokenInput
    from interp.patching.tasks import PatchingTask


@dataclass
class DLAResult:
    """``table``: one row per component (kind, layer, head, mean and std of the contribution over
    prompts); ``per_prompt``: [prompts, components]; ``logit_diff``: the model's own value per
    prompt; ``residual``: logit_diff minus the sum of the components, per prompt; ``latents``:
    dictionary rows (empty without a dictionary)."""

    table: pd.DataFrame
    per_prompt: pd.DataFrame
    logit_diff: torch.Tensor
    residual: torch.Tensor
    latents: pd.DataFrame

    def top_heads(self, n: int = 10) -> pd.DataFrame:
        heads = self.table[self.table.kind == "head"]
        return heads.reindex(heads["mean"].abs().sort_values(ascending=False).index).head(n)

    def summary(self) -> str:
        total = float(self.logit_diff.mean())
        return (f"logit difference {total:.4f} (mean over {len(self.logit_diff)} prompts); sum of components minus it: "
                f"max |residual| {float(self.residual.abs().max()):.2e}")

    def figure(self, top: int = 20):
        from interp.viz.lens import dla_figure

        return dla_figure(self, top)


def direct_logit_attribution(
    model: Model,
    inputs: TokenInput,
    answer: str | int | torch.Tensor | list,
    wrong: str | int | torch.Tensor | list | None = None,
    *,
    position: int = -1,
    dictionary: SparseDictionary | None = None,
    prepend_bos: bool | None = None,
) -> DLAResult:
    """Attribute logit[answer] - logit[wrong] (or logit[answer] alone) at ``position`` of each prompt.

    ``answer`` / ``wrong``: one token (string or id) for every prompt, or one id per prompt.
    """
    batch = model.tokenize(inputs, prepend_bos=prepend_bos)
    n = batch.ids.shape[0]
    answer_ids = _per_prompt(model, answer, n, "answer")
    wrong_ids = None if wrong is None else _per_prompt(model, wrong, n, "wrong")
    real = batch.real()
    rows = torch.arange(n)
    lengths = real.sum(1)
    pos = lengths + position if position < 0 else torch.full((n,), position)
    if bool((pos < 0).any() | (pos >= lengths).any()):
        raise InputError(f"position {position} is outside some prompt (lengths {lengths.tolist()})")
    if bool((~real[rows, pos]).any()) or (batch.mask is not None and bool((~real[:, : int(lengths.min())]).any())):
        raise InputError("direct_logit_attribution takes right-padded prompts (the default of model.tokenize)")
    layers = range(model.cfg.n_layers)
    embed_sites = [s for s in ("hook_embed", "hook_pos_embed") if s in model.site_table]
    sites = [*embed_sites, *(model.site(k, layer) for layer in layers for k in ("z", "attn_out", "mlp_out")), final_site(model)]
    if dictionary is not None:
        sites += [dictionary.config.input_site, dictionary.config.output_site or dictionary.config.input_site]
    cache = model.run_with_cache(batch, list(dict.fromkeys(sites)))

    def at(site: str) -> torch.Tensor:
        value = cache[site]
        value = value.expand(n, *value.shape[1:]) if value.shape[0] == 1 else value  # GPT-2's position embeddings
        return value[rows, pos].float()

    readout = Readout(model)
    final = at(final_site(model))
    scale = readout.norm.scale(final)
    direction = readout.W_U[answer_ids] - (readout.W_U[wrong_ids] if wrong_ids is not None else 0)  # [n, d]
    gain = readout.norm.gain

    def contribution(vectors: torch.Tensor) -> torch.Tensor:
        """[n, ..., d] component vectors -> [n, ...] logit-difference contributions (frozen scale)."""
        shape = (n,) + (1,) * (vectors.ndim - 2) + (-1,)
        return (readout.norm.center(vectors) * gain / scale.view(*shape[:-1], 1) * direction.view(shape)).sum(-1)

    columns: dict[str, torch.Tensor] = {}
    labels: list[tuple[str, str, int, int]] = []

    def add(name: str, kind: str, layer: int, head: int, value: torch.Tensor) -> None:
        columns[name] = value
        labels.append((name, kind, layer, head))

    summed = torch.zeros_like(final)
    for site in embed_sites:
        add(site.removeprefix("hook_"), "embed", -1, -1, contribution(at(site)))
        summed += at(site)
    for layer in layers:
        heads, bias = _head_outputs(model, layer, at(model.site("z", layer)))
        attn_out = at(model.site("attn_out", layer))
        _check(heads.sum(1) + bias, attn_out, f"layer {layer}: the heads' outputs plus the output bias do not add up to hook_attn_out")
        for h, value in enumerate(contribution(heads).T):
            add(f"L{layer}.H{h}", "head", layer, h, value)
        if bool(bias.any()):
            add(f"L{layer}.attn_bias", "attn_bias", layer, -1, contribution(bias.expand(n, -1)))
        add(f"L{layer}.mlp", "mlp", layer, -1, contribution(at(model.site("mlp_out", layer))))
        summed += attn_out + at(model.site("mlp_out", layer))
    _check(summed, final, "the embeddings plus every block's attention and MLP outputs do not add up to the last residual "
                          "stream (this architecture's blocks transform their outputs before adding them)")
    if readout.norm.bias is not None:
        add("final_norm_bias", "bias", -1, -1, (readout.norm.bias * direction).sum(-1))
    if readout.b_U is not None:
        unembed_bias = readout.b_U[answer_ids] - (readout.b_U[wrong_ids] if wrong_ids is not None else 0)
        add("unembed_bias", "bias", -1, -1, unembed_bias)

    logits = readout.logits(final)
    actual = logits[rows, answer_ids] - (logits[rows, wrong_ids] if wrong_ids is not None else 0)
    per_prompt = pd.DataFrame({name: value.detach().numpy() for name, value in columns.items()})
    stacked = torch.stack(list(columns.values()), dim=1)
    table = pd.DataFrame(labels, columns=["component", "kind", "layer", "head"])
    table["mean"], table["std"] = stacked.mean(0).numpy(), stacked.std(0, unbiased=False).numpy()
    latents = pd.DataFrame()
    if dictionary is not None:
        latents = _latent_rows(model, dictionary, at, contribution)
    return DLAResult(table, per_prompt, actual, actual - stacked.sum(1), latents)


def dla_task(model: Model, task: PatchingTask, *, dictionary: SparseDictionary | None = None) -> DLAResult:
    """DLA of a patching task's metric (answer minus competing answer) on its clean prompts."""
    return direct_logit_attribution(model, task.clean, task.answer, task.wrong, dictionary=dictionary)


def _per_prompt(model: Model, value: object, n: int, what: str) -> torch.Tensor:
    """One token id per prompt from a single token (str or id) or a sequence / tensor of n of them."""
    if isinstance(value, str | int):
        return torch.tensor(token_ids(model, value) * n)
    ids = value.long().reshape(-1) if isinstance(value, torch.Tensor) else torch.tensor(token_ids(model, list(value)))
    if len(ids) != n:
        raise InputError(f"{what}: {len(ids)} tokens for {n} prompts (give one token, or one per prompt)")
    if bool((ids < 0).any() | (ids >= model.cfg.d_vocab).any()):
        raise InputError(f"{what}: token ids must lie in 0..{model.cfg.d_vocab - 1}")
    return ids


def _head_outputs(model: Model, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head outputs [n, heads, d] of the attention output projection, and its bias [d]."""
    n, heads, d_head = z.shape
    attn = getattr(model.module, "blocks", None)
    with torch.no_grad():
        if attn is not None and hasattr(attn[layer].attn, "W_O"):  # TransformerLens
            block = attn[layer].attn
            return torch.einsum("nhe,hed->nhd", z, block.W_O.float()), block.b_O.detach().float()
        proj = model.module.get_submodule(f"{model.arch.layers}.{layer}.{model.arch.attn_out_proj}")
        dtype = next(proj.parameters()).dtype
        spread = torch.zeros(n, heads, heads, d_head, dtype=dtype)  # head h's z in its own slot, zeros elsewhere
        index = torch.arange(heads)
        spread[:, index, index] = z.to(dtype)
        bias = proj(torch.zeros(1, heads * d_head, dtype=dtype))[0].float()
        return proj(spread.reshape(n, heads, heads * d_head)).float() - bias, bias


def _check(got: torch.Tensor, expected: torch.Tensor, message: str) -> None:
    tolerance = 1e-3 * float(expected.abs().max()) + 1e-4
    if float((got - expected).abs().max()) > tolerance:
        raise ArchitectureError(f"{message}; direct logit attribution would be wrong here")


def _latent_rows(model: Model, dictionary: SparseDictionary, at, contribution) -> pd.DataFrame:
    """Per-latent contributions of the dictionary's output site (plus decoder bias and error)."""
    config = dictionary.config
    out_site = config.output_site or config.input_site
    info = model.site_table.info(out_site)
    if info.kind not in ("attn_out", "mlp_out", "resid_pre", "resid_mid", "resid_post"):
        raise InputError(f"a dictionary for DLA must write an attention output, MLP output or residual site, not {out_site}")
    with torch.no_grad():
        code = dictionary.encode(at(config.input_site))
        acts = code.to_dense(config.n_latents).float()  # [n, latents]
        decoder = dictionary.W_dec.detach().float() / dictionary.output_scale
        per_latent = contribution(acts[:, :, None] * decoder[None])  # [n, latents]
        bias = contribution((dictionary.b_dec.detach().float() / dictionary.output_scale).expand(acts.shape[0], -1))
        error = contribution(at(out_site) - dictionary.decode(code).float())
    active = (acts != 0).any(0)
    rows = [{"site": out_site, "component": f"latent {j}", "latent": j, "mean": float(per_latent[:, j].mean()),
             "mean_activation": float(acts[:, j].mean())} for j in active.nonzero().squeeze(1).tolist()]
    rows.sort(key=lambda r: -abs(r["mean"]))
    rows += [{"site": out_site, "component": "decoder bias", "latent": -1, "mean": float(bias.mean()), "mean_activation": float("nan")},
             {"site": out_site, "component": "reconstruction error", "latent": -1, "mean": float(error.mean()), "mean_activation": float("nan")}]
    return pd.DataFrame(rows)
