"""Quality parity with EleutherAI sparsify on the same store and token budget (issue: SAE trainer).

    pip install -e ".[bench]"
    python experiments/bench/bench_sae_quality.py --store STORE [--tokens 2M] [--latents 8192] [--k 32]

Both train a TopK SAE on the same training rows, in the same shuffled order, with the same
batch size, Adam learning rate and schedule (interp's: warm-up then linear decay). Each keeps its
own design otherwise: interp normalises inputs, starts b_dec at the data mean and uses AuxK on
latents dead for tokens/8; sparsify (its SparseCoder forward, AuxK mask after its default 10M
tokens, decoder renormalisation and gradient projection) starts b_dec at zero. Both are evaluated
on the store's held-out rows with interp's metric code: FVU (also without the massive-norm
rows, ``fvu_inliers``) and the fraction of latents that never fired during training. Goal: interp's FVU within 2% of sparsify's and no more dead latents.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
# sparsify picks a Triton decoder whenever triton is installed, CUDA or not; on a CPU use its eager one.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if torch.cuda.is_available() else "1")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def sparsify_run(trainer, k: int) -> dict:
    """sparsify's SparseCoder trained on exactly the batches interp's trainer reads."""
    from sparsify import SparseCoder, SparseCoderConfig

    from interp.dictionary.metrics import reconstruction_metrics

    store, c = trainer.store, trainer.config
    d = store.d(trainer.in_site)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=c.latents, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=trainer.lr)
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
            group["lr"] = trainer.lr_at(step)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since > 10_000_000)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since += x.shape[0]
        since[out.latent_indices.flatten()] = 0
    seconds = time.perf_counter() - start
    dictionary = _as_dictionary(sae, trainer, k)
    held_out = (trainer.train_rows[1], store.n_rows)
    metrics = reconstruction_metrics(dictionary, store, held_out)
    metrics["dead_fraction"] = float((since >= trainer.steps * trainer.batch_size).double().mean())
    metrics["train_seconds"] = seconds
    return metrics


def _as_dictionary(sae, trainer, k: int):
    """sparsify's weights in a SparseDictionary (same function: it subtracts b_dec before encoding too)."""
    from interp.dictionary import DictionaryConfig, SparseDictionary

    d = SparseDictionary(DictionaryConfig(d_in=sae.d_in, n_latents=sae.num_latents, k=k, input_site=trainer.in_site))
    with torch.no_grad():
        d.W_enc.copy_(sae.encoder.weight)
        d.b_enc.copy_(sae.encoder.bias)
        d.W_dec.copy_(sae.W_dec)
        d.b_dec.copy_(sae.b_dec)
    return d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True, help="a store with blocks.12.hook_resid_post (e.g. from the headline run)")
    parser.add_argument("--site", default="blocks.12.hook_resid_post")
    parser.add_argument("--tokens", default="2M")
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "sae_quality.json")
    args = parser.parse_args()

    from interp.dictionary import TrainConfig
    from interp.dictionary.train import Trainer

    run_dir = RESULTS / "sae_quality_interp"
    config = TrainConfig(model="none", store=args.store, site=args.site, k=str(args.k), latents=args.latents,
                         tokens=args.tokens, eval_contexts=0, out=run_dir, checkpoint_every=10**9)
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(config)
    ours = next(iter(trainer.run().values()))
    theirs = sparsify_run(trainer, args.k)
    print(f"\nTopK SAE, {args.site}, {args.latents} latents, k={args.k}, {trainer.steps * trainer.batch_size:,} tokens; "
          f"held-out rows {trainer.store.n_rows - trainer.train_rows[1]:,}")
    print(f"{'':12s}{'FVU':>10s}{'FVU inliers':>13s}{'dead':>10s}{'L0':>8s}{'train s':>10s}")
    for name, m in (("interp", ours), ("sparsify", theirs)):
        print(f"{name:12s}{m['fvu']:10.4f}{m['fvu_inliers']:13.4f}{m['dead_fraction']:10.4f}{m['l0']:8.1f}{m['train_seconds']:10.1f}")
    ratio = ours["fvu"] / theirs["fvu"]
    print(f"FVU interp / sparsify = {ratio:.3f} (goal <= 1.02); dead {ours['dead_fraction']:.4f} vs {theirs['dead_fraction']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"interp": ours, "sparsify": theirs, "fvu_ratio": ratio}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
