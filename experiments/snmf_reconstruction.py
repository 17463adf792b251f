"""SNMF reconstruction error against the number of features k (and the initialisation), on SmolLM2.

    python experiments/snmf_reconstruction.py --store STORE [--layer 12] [--ks 25,50,100,200,400]
                                              [--inits random] [--tokens 100k] [--split test] [--save DIR]

Fits SNMF on the first ``--tokens`` rows of the store's ``blocks.L.mlp.hook_post`` and reports, per
(init, k): the training error of the best iterate, and the error on held-out rows (coefficients by
non-negative least squares with Z fixed): the *dev* rows (the ``--heldout`` rows after the training
rows; used to choose defaults) or the *test* rows (the store's last ``--heldout`` rows; used to report).
Errors are ``‖A − YZᵀ‖² / ‖A‖²`` (what SNMF minimises) and the FVU ``‖A − YZᵀ‖² / ‖A − Ā‖²``.
Beside each k, the best any rank-k factorisation can do on the training rows (truncated SVD, from
the eigenvalues of AᵀA): SNMF pays for non-negative Y and ⌈p·d_mlp⌉-neuron features.
Writes ``runs/snmf_reconstruction-<split>.json`` and prints a markdown table. With ``--save DIR``
each fit is kept as ``DIR/level0-k<k>`` (the layout of ``interp snmf --out DIR``, so
``interp snmf --out DIR --k <k> --resume`` reports its features) and a fit already there with the
same settings and rows is loaded instead of refitted.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from interp.config import parse_count
from interp.snmf import SNMF, SNMFConfig, StoreActivations, evaluate, fit_snmf
from interp.store import ActivationStore


def svd_floor(source: StoreActivations, ks: list[int], chunk: int = 16_384) -> dict[int, float]:
    """1 − (sum of the top-k eigenvalues of AᵀA) / ‖A‖²: the best rank-k relative error."""
    gram = torch.zeros(source.d, source.d, dtype=torch.float64)
    for _, A in source.chunks(chunk, torch.device("cpu")):
        gram += (A.T @ A).double()
    values = torch.linalg.eigvalsh(gram).flip(0)
    total = float(gram.trace())
    return {k: 1 - float(values[:k].sum()) / total for k in ks}


def fit_or_load(train: StoreActivations, config: SNMFConfig, save: Path | None) -> SNMF:
    """Fit, or load the fit ``save`` already holds for exactly these settings and rows."""
    folder = save / f"level0-k{config.k}" if save is not None else None
    if folder is not None and (folder / "snmf.json").exists():
        saved = SNMF.load(folder)
        if asdict(saved.config) == asdict(config) and saved.source == train.describe():
            print(f"reusing the fit in {folder}", flush=True)
            return saved
        raise SystemExit(f"{folder} holds a fit with other settings or rows; choose another --save")
    snmf = fit_snmf(train, config, progress=False)
    if folder is not None:
        snmf.save(folder)
    return snmf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--ks", default="25,50,100,200,400")
    parser.add_argument("--inits", default="kmeans")
    parser.add_argument("--tokens", default="100k")
    parser.add_argument("--heldout", default="32k", help="rows in each of the dev and test splits")
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--save", type=Path, default=None, help="keep each fit in SAVE/level0-k<k> (and reuse it)")
    args = parser.parse_args()

    store = ActivationStore(args.store)
    site = f"blocks.{args.layer}.mlp.hook_post"
    tokens, heldout = parse_count(args.tokens), parse_count(args.heldout)
    if tokens + 2 * heldout > store.n_rows:
        raise SystemExit(f"{args.store} has {store.n_rows:,} rows: too few for {tokens:,} training rows and two splits of {heldout:,}")
    train = StoreActivations(store, site, (0, tokens))
    rows = (tokens, tokens + heldout) if args.split == "dev" else (store.n_rows - heldout, store.n_rows)
    held = StoreActivations(store, site, rows)
    ks = [int(k) for k in args.ks.split(",")]
    floor = svd_floor(train, ks)
    results = []
    for init in args.inits.split(","):
        for k in ks:
            config = SNMFConfig(k=k, init=init, max_iter=args.max_iter, patience=args.patience, seed=args.seed)
            snmf = fit_or_load(train, config, args.save)
            scores = evaluate(snmf, held)
            row = {"init": init, "k": k, "iterations": snmf.info["iterations"], "best_iteration": snmf.info["best_iteration"],
                   "train_relative_error": snmf.info["relative_error"], "train_fvu": snmf.info["fvu"],
                   f"{args.split}_relative_error": scores["relative_error"], f"{args.split}_fvu": scores["fvu"],
                   "svd_rank_k_relative_error": floor[k], "dead_features": snmf.info["dead_features"],
                   "seconds": round(snmf.info["seconds"], 1), "history": snmf.info["history"]}
            results.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "history"}), flush=True)

    out = Path(args.out) / f"snmf_reconstruction-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"store": str(store.root), "site": site, "train_rows": [0, tokens], f"{args.split}_rows": list(rows),
            "max_iter": args.max_iter, "patience": args.patience, "seed": args.seed}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n| init | k | iterations (best) | train rel. error | {args.split} rel. error | {args.split} FVU | rank-k SVD rel. error | dead |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['init']} | {r['k']} | {r['iterations']} ({r['best_iteration']}) | {r['train_relative_error']:.4f} | "
              f"{r[f'{args.split}_relative_error']:.4f} | {r[f'{args.split}_fvu']:.4f} | {r['svd_rank_k_relative_error']:.4f} | "
              f"{r['dead_features']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
