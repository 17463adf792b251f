"""EleutherAI sparsify trained on exactly the batches interp's trainer reads (a baseline).

Same training rows, shuffled order, batch size, Adam learning rate and schedule as the interp
``Trainer`` it is given, and the same AuxK dead threshold (the trainer's ``auxk_dead``: sparsify's own
10M tokens would never be reached in a short run, leaving its AuxK off); otherwise sparsify keeps its
own design (its SparseCoder forward, decoder renormalisation and gradient projection, b_dec starting
at zero). The result is converted into a ``SparseDictionary`` computing the same function,
so one evaluation code scores both.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from interp.dictionary import DictionaryConfig, SparseDictionary


def sparsify_available() -> str | None:
    """None when sparsify can be imported, else why not."""
    _cpu_decoder()
    try:
        import sparsify  # noqa: F401
    except ImportError as err:
        return f"EleutherAI sparsify is not installed ({err}); pip install eai-sparsify"
    return None


def _cpu_decoder() -> None:
    # sparsify picks a Triton decoder whenever triton is installed, CUDA or not; on a CPU use its eager one.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if torch.cuda.is_available() else "1")


def train_sparsify(trainer: Any, k: int, rate: float | None = None) -> tuple[SparseDictionary, dict[str, float]]:
    """A sparsify SparseCoder with ``k`` trained on ``trainer``'s batches and schedule at ``rate`` (default the
    schedule's; give the rate interp kept where it trained two); (dictionary, training stats)."""
    _cpu_decoder()
    from sparsify import SparseCoder, SparseCoderConfig

    store, c = trainer.store, trainer.config
    sae = SparseCoder(store.d(trainer.in_site), SparseCoderConfig(num_latents=c.latents, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=rate or trainer.lr)
    since = torch.zeros(c.latents, dtype=torch.long)
    loader = store.batches(trainer.in_site, trainer.batch_size, shuffle=True, seed=c.seed, rows=trainer.train_rows, drop_last=True)
    batches = iter(loader)
    start = time.perf_counter()
    for step in range(trainer.steps):
        try:
            x = next(batches)
        except StopIteration:
            batches = iter(loader)
            x = next(batches)
        for group in opt.param_groups:
            group["lr"] = trainer.lr_at(step, rate)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since >= trainer.auxk_dead)  # interp's AuxK threshold, not sparsify's fixed 10M
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since += x.shape[0]
        since[out.latent_indices.flatten()] = 0
    stats = {"train_seconds": time.perf_counter() - start, "tokens": trainer.steps * trainer.batch_size,
             "dead_fraction": float((since >= trainer.steps * trainer.batch_size).double().mean())}
    return as_dictionary(sae, trainer.in_site, k), stats


def as_dictionary(sae: Any, site: str, k: int) -> SparseDictionary:
    """sparsify's weights in a SparseDictionary (the same function: it subtracts b_dec before encoding too)."""
    d = SparseDictionary(DictionaryConfig(d_in=sae.d_in, n_latents=sae.num_latents, k=k, input_site=site))
    with torch.no_grad():
        d.W_enc.copy_(sae.encoder.weight)
        d.b_enc.copy_(sae.encoder.bias)
        d.W_dec.copy_(sae.W_dec)
        d.b_dec.copy_(sae.b_dec)
    return d
