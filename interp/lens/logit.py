"""Read a prompt's residual stream at every layer through the model's readout.

``logit_lens`` runs the model once with every requested residual site cached, then decodes
each (prompt, layer, position) through the final norm and unembedding, optionally after a
tuned or linear-map translator. The unembedding runs over chunks of rows, so memory stays at
a few chunk x vocabulary matrices whatever the prompt length and vocabulary size.

The final norm's scale is either recomputed from each layer's own residual (``norm="recompute"``,
nostalgebraist's logit lens: each layer is read as if it were the last) or frozen at the last
layer's scale for that position (``norm="frozen"``: every layer's residual is read through the
same linear map the model applies to its final residual, so the lens of a sum of components is
the sum of their lenses, as in direct logit attribution). Early layers have smaller residual
norms than the last, so the frozen scale gives flatter (higher-entropy) early distributions.

KL is KL(final || lens) = sum_v p_final(v) (log p_final(v) - log p_lens(v)), in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch

from interp.errors import InputError
from interp.lens.readout import Readout, vocabulary
from interp.lens.translators import AffineLens, final_site, resid_sites

if TYPE_CHECKING:
    from interp.models.model import Model, TokenInput

NORM_MODES = ("recompute", "frozen")
CHUNK_ELEMENTS = 2**24  # rows x vocabulary per unembedding chunk (64 MB of float32)


@dataclass
class LensResult:
    """``table``: one row per (prompt, layer, position): the top tokens and probabilities and KL
    to the model's final distribution. ``tokens``: one row per (prompt, layer, position, chosen
    token): its probability, logit and rank (1 = top)."""

    table: pd.DataFrame
    tokens: pd.DataFrame
    str_tokens: list[list[str]]
    lens: str
    norm: str

    def figure(self, prompt: int = 0):
        """Layers x positions: each cell's top token, coloured by its probability."""
        from interp.viz.lens import top_token_figure

        return top_token_figure(self, prompt)

    def token_figure(self, prompt: int = 0, position: int | None = None):
        """Probability and rank of the chosen tokens per layer (at the last position by default)."""
        from interp.viz.lens import token_figure

        return token_figure(self, prompt, position)


def logit_lens(
    model: Model,
    inputs: TokenInput,
    *,
    site: str | None = None,
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    top_k: int = 5,
    tokens: str | int | Sequence[str | int] | None = None,
    norm: str = "recompute",
    lens: AffineLens | None = None,
    prepend_bos: bool | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> LensResult:
    """Decode every requested layer's residual stream (see the module docstring).

    site: residual kind (``resid_post`` by default; ``resid_pre`` / ``resid_mid``), or the
        lens's own sites when ``lens`` is given and ``site`` is None.
    positions: None for every real token; ints (negative count from each prompt's end).
    tokens: chosen tokens (single-token strings or ids) whose probability and rank to follow.
    lens: a tuned or linear-map lens (``AffineLens``); None is the logit lens.
    """
    if norm not in NORM_MODES:
        raise InputError(f"norm={norm!r}: choose one of {', '.join(NORM_MODES)}")
    if top_k < 1:
        raise InputError(f"top_k={top_k}: need at least 1")
    if lens is not None:
        lens.check_model(model)
    sites = lens.sites if lens is not None and site is None and layers is None else resid_sites(model, site or "resid_post", layers)
    last = final_site(model)
    if lens is not None:
        for name in sites:
            if name != last:
                lens.index(name)  # every site needs a translator (the final residual is the model's own output)
    tracked = token_ids(model, tokens)
    batch = model.tokenize(inputs, prepend_bos=prepend_bos)
    cache = model.run_with_cache(batch, list(dict.fromkeys([*sites, last])))
    rows = _rows(batch.real(), positions)
    readout = Readout(model)
    texts = vocabulary(model)
    vocab = readout.W_U.shape[0]
    step = max(1, chunk_elements // vocab)
    top_k = min(top_k, vocab)
    records, token_records = [], []
    with torch.no_grad():
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            prompt_ix, pos_ix = torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk])
            final = cache[last][prompt_ix, pos_ix].float()
            final_logp = readout.logits(final).log_softmax(-1)
            final_p = final_logp.exp()
            scale = readout.norm.scale(final) if norm == "frozen" else None
            for name in sites:
                h = cache[name][prompt_ix, pos_ix].float()
                if lens is not None and name != last:
                    h = lens.translate(h, name)
                logits = readout.logits(h, scale=scale)
                logq = logits.log_softmax(-1)
                kl = (final_p * (final_logp - logq)).sum(-1)
                top = logq.topk(top_k, dim=-1)
                layer = model.site_table.info(name).layer
                for i, (prompt, pos) in enumerate(chunk):
                    records.append({
                        "prompt": prompt, "layer": layer, "site": name, "position": pos,
                        "input_token": texts[int(batch.ids[prompt, pos])],
                        "top_tokens": list(texts[top.indices[i].numpy()]),
                        "top_probs": [round(p, 5) for p in top.values[i].exp().tolist()],
                        "kl": float(kl[i]),
                    })
                for token in tracked:
                    chosen = logits[:, token : token + 1]
                    ranks = (logits > chosen).sum(-1) + 1
                    for i, (prompt, pos) in enumerate(chunk):
                        token_records.append({
                            "prompt": prompt, "layer": layer, "site": name, "position": pos, "token": texts[token],
                            "token_id": token, "prob": float(logq[i, token].exp()), "logit": float(chosen[i, 0]), "rank": int(ranks[i]),
                        })
    str_tokens = [[texts[int(t)] for t, real in zip(row, mask, strict=True) if real]
                  for row, mask in zip(batch.ids, batch.real(), strict=True)]
    token_columns = ["prompt", "layer", "site", "position", "token", "token_id", "prob", "logit", "rank"]
    return LensResult(
        table=pd.DataFrame(records).sort_values(["prompt", "layer", "position"], kind="stable", ignore_index=True),
        tokens=pd.DataFrame(token_records, columns=token_columns).sort_values(["prompt", "layer", "position"], kind="stable", ignore_index=True),
        str_tokens=str_tokens, lens="logit" if lens is None else lens.kind, norm=norm,
    )


def token_ids(model: Model, tokens: str | int | Sequence[str | int] | None) -> list[int]:
    """Ids of chosen tokens given as single-token strings or ids."""
    if tokens is None:
        return []
    items = [tokens] if isinstance(tokens, str | int) else list(tokens)
    vocab = model.cfg.d_vocab
    ids = []
    for item in items:
        if isinstance(item, int):
            if not 0 <= item < vocab:
                raise InputError(f"token id {item} is out of range 0..{vocab - 1}")
            ids.append(item)
            continue
        encoded = model.tokenizer(item, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            pieces = [model.to_string([t]) for t in encoded]
            raise InputError(f"{item!r} is {len(encoded)} tokens {pieces}, not one; pass a single token (mind the leading space)")
        ids.append(int(encoded[0]))
    return ids


def _rows(real: torch.Tensor, positions: int | Sequence[int] | None) -> list[tuple[int, int]]:
    """(prompt, position) pairs to decode: every real token, or the given positions of each prompt."""
    rows = []
    for prompt, mask in enumerate(real.cpu()):
        present = mask.nonzero().squeeze(1).tolist()  # real tokens, whichever side was padded
        if positions is None:
            rows.extend((prompt, pos) for pos in present)
            continue
        for p in [positions] if isinstance(positions, int) else positions:
            if not -len(present) <= p < len(present):
                raise InputError(f"position {p} is outside prompt {prompt}, which has {len(present)} tokens")
            rows.append((prompt, present[p]))
    return rows
