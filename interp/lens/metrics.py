"""Lens quality on store rows, and the fused KL used to train tuned lenses.

``evaluate_lenses`` reads residual rows and the last layer's residual from an activation store
and reports, per lens and site, over the given rows:

- ``kl``: mean KL(final || lens) in nats;
- ``precision_at_1``: how often the lens's top token is the model's top token;
- ``surprisal``: mean -log p_lens(the model's top token), nats (Din et al.'s second metric).

``kl_and_grad`` computes, for lens logits z and a target distribution p, KL(p || softmax(z))
per row and its gradient softmax(z) - p in a few passes over the [rows, vocab] matrix (the
sum over p log p is computed once per batch and shared by every layer). Compiled with
``torch.compile`` when asked and available, it fuses into two loops over the matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.lens.readout import Readout
from interp.lens.translators import AffineLens, final_site, model_fingerprint

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.store import ActivationStore


def kl_and_grad_eager(z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor, bias: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p || softmax(z)) per row (float32) and softmax(z) - p (in z's dtype).

    neg_entropy: sum_v p log p per row (precomputed once per target batch).
    """
    logits = z.float() if bias is None else z.float() + bias
    peak = logits.amax(-1, keepdim=True)
    e = (logits - peak).exp_()
    total = e.sum(-1, keepdim=True)
    kl = neg_entropy - torch.einsum("rv,rv->r", p, logits) + (peak + total.log()).squeeze(-1)
    return kl, e.div_(total).sub_(p).to(z.dtype)


_compiled: dict[str, Callable] = {}


def kl_and_grad(z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor, bias: torch.Tensor | None = None, *,
                compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``kl_and_grad_eager``, compiled with ``torch.compile`` when ``compile`` (eager if that fails)."""
    if not compile:
        return kl_and_grad_eager(z, p, neg_entropy, bias)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(kl_and_grad_eager, dynamic=False)
    try:
        return _compiled["fn"](z, p, neg_entropy, bias)
    except Exception as err:  # no C++ compiler, unsupported platform...: same numbers, slower
        warnings.warn(f"torch.compile of the fused KL failed ({type(err).__name__}); using eager mode", stacklevel=2)
        _compiled["fn"] = kl_and_grad_eager
        return kl_and_grad_eager(z, p, neg_entropy, bias)


def check_store(store: ActivationStore, model: Model, sites: Sequence[str]) -> None:
    """The store must come from this model and hold ``sites`` (clear errors otherwise)."""
    identity = store.manifest.get("identity", {})
    made_for = identity.get("model_fingerprint")
    if made_for is None:
        raise InputError(f"{store.root} records no model fingerprint (made by write_arrays?); lenses need a harvested store")
    if made_for != model_fingerprint(model):
        raise InputError(
            f"{store.root} was harvested from {identity.get('model')!r} (weights fingerprint {made_for[:12]}), not from "
            f"{model.cfg.name!r} ({model_fingerprint(model)[:12]}); harvest a store for this model"
        )
    missing = [s for s in sites if s not in store.sites]
    if missing:
        raise InputError(
            f"{store.root} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; it holds {', '.join(store.sites[:6])}"
            f"{' ...' if len(store.sites) > 6 else ''}. Harvest the residual sites and {final_site(model)}"
        )


def evaluate_lenses(
    model: Model,
    store: ActivationStore,
    lenses: Mapping[str, AffineLens | None],
    sites: Sequence[str],
    rows: tuple[int, int],
    *,
    batch_size: int = 256,
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (lens, site): kl, precision_at_1, surprisal over store ``rows`` (see module docstring).

    ``lenses`` maps a name to an ``AffineLens`` or None (the logit lens). ``compute_dtype``
    runs the unembedding matmul in that dtype (default float32: exact).
    """
    last = final_site(model)
    check_store(store, model, [*sites, last])
    for lens in lenses.values():
        if lens is not None:
            lens.check_model(model)
    readout = Readout(model)
    totals = {(name, site): torch.zeros(3, dtype=torch.float64) for name in lenses for site in sites}
    count = 0
    reader = store.batches([*dict.fromkeys([*sites, last])], batch_size, rows=rows)
    with torch.no_grad():
        for batch in tqdm(reader, desc="evaluate lenses", disable=not progress, leave=False):
            final_logp = readout.logits(batch[last]).log_softmax(-1)
            final_p = final_logp.exp()
            neg_entropy = (final_p * final_logp).sum(-1)
            best = final_logp.argmax(-1, keepdim=True)
            for name, lens in lenses.items():
                for site in sites:
                    h = batch[site]
                    if lens is not None and site != last:
                        h = lens.translate(h, site)
                    logq = readout.logits(h, dtype=compute_dtype).log_softmax(-1)
                    kl = neg_entropy - (final_p * logq).sum(-1)
                    hit = (logq.argmax(-1, keepdim=True) == best).double()
                    surprisal = -logq.gather(-1, best)
                    totals[name, site] += torch.stack([kl.double().sum(), hit.sum(), surprisal.double().sum()])
            count += len(final_p)
    records = []
    for (name, site), (kl, hits, surprisal) in totals.items():
        info = model.site_table.info(site)
        records.append({"lens": name, "site": site, "kind": info.kind, "layer": info.layer, "kl": float(kl) / count,
                        "precision_at_1": float(hits) / count, "surprisal": float(surprisal) / count, "tokens": count})
    return pd.DataFrame(records)
