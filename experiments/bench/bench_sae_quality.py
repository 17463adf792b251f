"""Quality parity with EleutherAI sparsify on the same store and token budget (issue: SAE trainer).

    pip install -e ".[bench]"
    python experiments/bench/bench_sae_quality.py --store STORE [--tokens 2M] [--latents 8192] [--k 32]

Both train a TopK SAE on the same training rows, in the same shuffled order, with the same
batch size, Adam learning rate and schedule (interp's: warm-up then linear decay; where massive activations
make interp train two rates in lockstep, sparsify trains at the one interp kept, and interp's train seconds
cover both). Each keeps its
own design otherwise: interp normalises inputs, starts b_dec at the data mean and uses AuxK on
latents dead for tokens/8; sparsify (its SparseCoder forward, AuxK mask after its default 10M
tokens, decoder renormalisation and gradient projection) starts b_dec at zero. Both are evaluated
on the store's held-out rows with interp's metric code: FVU (also without the massive-norm
rows, ``fvu_inliers``) and the fraction of latents that never fired during training. Goal: interp's FVU within 2% of sparsify's and no more dead latents.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def sparsify_run(trainer, k: int, rate: float) -> dict:
    """sparsify trained on exactly the batches interp's trainer reads, scored on the held-out rows."""
    from interp.dictionary.metrics import reconstruction_metrics
    from interp.experiments.sparsify_baseline import train_sparsify

    dictionary, stats = train_sparsify(trainer, k, rate)
    metrics = reconstruction_metrics(dictionary, trainer.store, (trainer.train_rows[1], trainer.store.n_rows))
    return {**metrics, **stats}


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
    theirs = sparsify_run(trainer, args.k, ours["lr"])
    print(f"\nTopK SAE, {args.site}, {args.latents} latents, k={args.k}, {trainer.steps * config.batch_size:,} tokens; "
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
