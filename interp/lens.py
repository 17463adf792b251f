"""Lenses: read the residual stream through the unembedding.

``logit_lens`` decodes each layer's residual stream with the model's own final norm and
unembedding (nostalgebraist's logit lens). At the last layer it equals the model's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import torch

if TYPE_CHECKING:
    from interp.models.model import Model, TokenInput


def logit_lens(
    model: Model,
    inputs: TokenInput,
    *,
    position: int = -1,
    top_k: int = 5,
    layers: list[int] | None = None,
) -> pd.DataFrame:
    """Top-``top_k`` next-token predictions read off each layer's ``hook_resid_post``.

    One row per (prompt, layer): the tokens and their probabilities at ``position`` (default:
    the last real token of each prompt).
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    sites = [model.site("resid_post", layer) for layer in layers]
    cache = model.run_with_cache(inputs, sites)
    real = (cache.attention_mask if cache.attention_mask is not None else torch.ones_like(cache.tokens)).bool()
    lengths = real.sum(1)
    rows = []
    for layer, site in zip(layers, sites, strict=True):
        resid = cache[site]
        for prompt in range(resid.shape[0]):
            pos = int(lengths[prompt]) + position if position < 0 else position
            with torch.no_grad():
                probs = model.unembed(resid[prompt, pos]).float().softmax(-1)
            top = probs.topk(top_k)
            rows.append(
                {
                    "prompt": prompt,
                    "layer": layer,
                    "position": pos,
                    "top_tokens": [model.to_string([i]) for i in top.indices.tolist()],
                    "top_probs": [round(p, 4) for p in top.values.tolist()],
                }
            )
    return pd.DataFrame(rows)
