"""What a latent responds to: its top-activating tokens, with their contexts, from a store.

``top_activations`` streams store rows once and keeps the ``n`` strongest activations of each
requested latent. ``latent_examples`` turns one latent's top rows into a table (text before the
token, the token, text after, and the latent's activation on every token of the context) for a
notebook, and ``interp.viz.dashboard`` renders the same as a static HTML page.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from interp.dictionary.sae import SparseDictionary
from interp.errors import InputError
from interp.store import ActivationStore


@torch.no_grad()
def top_activations(
    dictionary: SparseDictionary, store: ActivationStore, latents: list[int] | None = None, *, n: int = 20,
    rows: tuple[int, int] | None = None, batch_size: int = 8192,
) -> pd.DataFrame:
    """The ``n`` highest activations of each latent over store ``rows`` (default: all rows).

    Columns: latent, rank, activation, row, context, position, token.
    """
    c = dictionary.config
    wanted = torch.arange(c.n_latents) if latents is None else torch.as_tensor(latents, dtype=torch.long)
    if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= c.n_latents):
        raise InputError(f"latents must lie in 0..{c.n_latents - 1}")
    best_v = torch.full((wanted.numel(), n), -1.0)
    best_r = torch.full((wanted.numel(), n), -1, dtype=torch.long)
    dictionary.eval()
    loader = store.batches(c.input_site, batch_size, rows=rows)
    for number, x in enumerate(loader):
        first = loader.rows_of(number).start
        acts = dictionary.encode(x).to_dense(c.n_latents)[:, wanted].T  # [latents, batch]
        take = min(n, acts.shape[1])
        values, where = acts.topk(take, dim=1)
        merged_v = torch.cat([best_v, values], dim=1)
        merged_r = torch.cat([best_r, where + first], dim=1)
        best_v, pick = merged_v.topk(n, dim=1)
        best_r = merged_r.gather(1, pick)
    keep = best_v > 0
    latent_ids = wanted[:, None].expand_as(best_v)[keep].numpy()
    ranks = torch.arange(n).expand_as(best_v)[keep].numpy()
    row_ids = best_r[keep].numpy()
    meta = store.rows(row_ids) if len(row_ids) else np.zeros((0, 5), dtype=np.int32)
    return pd.DataFrame({
        "latent": latent_ids, "rank": ranks, "activation": best_v[keep].numpy(), "row": row_ids,
        "context": meta[:, 0], "position": meta[:, 1], "token": meta[:, 2],
    })


@torch.no_grad()
def latent_examples(
    dictionary: SparseDictionary, store: ActivationStore, tokenizer: Any, latent: int, *, n: int = 20,
    top: pd.DataFrame | None = None, left: int = 24, right: int = 6,
) -> pd.DataFrame:
    """One row per top example of ``latent``: text before, the token, text after, and per-token activations."""
    top = top_activations(dictionary, store, [latent], n=n) if top is None else top[top["latent"] == latent]
    table = store.rows()
    records = []
    for example in top.itertuples():
        in_context = np.flatnonzero(table[:, 0] == example.context)
        positions = table[in_context, 1]
        order = np.argsort(positions)
        rows, positions = in_context[order], positions[order]
        acts = dictionary.encode(store.read(dictionary.config.input_site, rows)).to_dense(dictionary.config.n_latents)[:, latent]
        tokens = [tokenizer.decode([int(t)]) for t in table[rows, 2]]
        at = int(np.flatnonzero(positions == example.position)[0])
        records.append({
            "rank": example.rank, "activation": float(example.activation), "context": int(example.context),
            "position": int(example.position),
            "left": "".join(tokens[max(0, at - left) : at]), "token": tokens[at], "right": "".join(tokens[at + 1 : at + 1 + right]),
            "tokens": tokens, "activations": acts.tolist(), "index": at,
        })
    return pd.DataFrame.from_records(records)


def latent_summary(dictionary: SparseDictionary, latent: int, model: Any = None, *, k: int = 8) -> dict[str, Any]:
    """The decoder direction's effect on the logits (residual-stream dictionaries, given the model)."""
    summary: dict[str, Any] = {"latent": latent}
    if model is None or dictionary.config.out_dim != model.cfg.d_model:
        return summary
    direction = dictionary.W_dec.detach()[latent].to(model.dtype)
    with torch.no_grad():
        logits = model.lm_head(direction)
    top, bottom = logits.topk(k), (-logits).topk(k)
    summary["promotes"] = [model.to_string([i]) for i in top.indices.tolist()]
    summary["suppresses"] = [model.to_string([i]) for i in bottom.indices.tolist()]
    return summary
