"""Per-layer KL to the final distribution for the logit, tuned and linear-map lenses on held-out text.

    python experiments/lens_kl.py [--out runs/lens_kl]

Data: one activation store of SmolLM2 over Shakespeare (512 contexts of 128 tokens; every
``blocks.L.hook_resid_pre`` and the last ``hook_resid_post``), harvested first if missing. It is
split by whole contexts: training (the first 416), development (the next 32), test (the last 64).
The contexts are disjoint windows of one pass over the corpus, so dev and test text never
overlaps training text.

Chosen on development tokens only (and recorded in choices.json):
- linear-map lens: the ridge of each layer, from RIDGES (relative to the mean diagonal of X^T X);
- tuned lens: optimizer and learning rate from TUNED_GRID, each trained for ``--dev-steps`` steps
  on every fourth layer (translators are independent given the batch, so the choice carries).
The chosen tuned lens is then trained on every layer for ``--steps`` steps. All three lenses are
evaluated on the test tokens: KL(final || lens), precision@1 and surprisal per layer (unembedding
matmuls in bfloat16; the script prints the largest difference to float32 on 8 test contexts).

Writes kl.csv, choices.json, kl.html (the plot) and the lenses (tuned/, linear/) into --out.
Rerunning with the same --out resumes: a saved linear lens (with its dev table), dev score and
tuned-lens checkpoint and test table (kl.csv, same number of test tokens) are reused, so only the
unfinished stages run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from interp.lens import AffineLens, LensTrainConfig, NormalEquations, evaluate_lenses, train_tuned_lens
from interp.lens.train import lens_store_sites
from interp.models import load_model
from interp.paths import interp_home, write_json
from interp.store import ActivationStore, HarvestConfig, harvest
from interp.viz.lens import kl_figure, write_figures

RIDGES = [0.0, 1e-4, 1e-3, 1e-2]
TUNED_GRID = [("adam", 1e-3), ("adam", 3e-3), ("sgd", 1.0)]
CONTEXTS, DEV, TEST = 512, 32, 64


def lens_store(path: Path, model) -> ActivationStore:
    """The store this experiment (and bench_tuned_lens.py) reads; harvested (resumably) if missing."""
    sites = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)] + [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    config = HarvestConfig(out=path, model="smollm2-135m", sites=",".join(sites), corpus="shakespeare", tokens=CONTEXTS * 127,
                           context_len=128, batch_size=16, shard_contexts=64)
    if (path / "manifest.json").exists() and ActivationStore(path).complete:
        return ActivationStore(path)
    return harvest(config, model=model)


def splits(store: ActivationStore) -> dict[str, tuple[int, int]]:
    per = int(store.manifest["rows_per_context"])
    n = store.n_rows
    return {"train": (0, n - (DEV + TEST) * per), "dev": (n - (DEV + TEST) * per, n - TEST * per), "test": (n - TEST * per, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None, help="default: INTERP_HOME/stores/lens-resid")
    parser.add_argument("--out", type=Path, default=Path("runs/lens_kl"))
    parser.add_argument("--steps", type=int, default=52, help="tuned lens: steps of --contexts-per-step contexts (52 x 8 = one epoch)")
    parser.add_argument("--contexts-per-step", type=int, default=8)
    parser.add_argument("--dev-steps", type=int, default=16)
    parser.add_argument("--test-contexts", type=int, default=TEST, help=f"evaluate on the first N of the {TEST} test contexts")
    parser.add_argument("--check-contexts", type=int, default=2,
                        help="test contexts also evaluated in float32 to bound the bfloat16 error (float32 costs 10x)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    store = lens_store(args.store or interp_home() / "stores" / "lens-resid", model)
    rows = splits(store)
    rows["test"] = (rows["test"][0], min(rows["test"][1], rows["test"][0] + args.test_contexts * int(store.manifest["rows_per_context"])))
    holdout = store.n_rows - rows["train"][1]  # dev + test: never trained on
    sites = lens_store_sites(model, store, "resid_pre")
    batch = args.contexts_per_step * int(store.manifest["rows_per_context"])
    args.out.mkdir(parents=True, exist_ok=True)
    timings = {}
    print(f"store {store.root}: {store.n_rows:,} rows; train {rows['train']}, dev {rows['dev']}, test {rows['test']}")

    # Linear-map lens: one pass of normal equations over the training rows, ridge per layer chosen on dev.
    if (args.out / "linear" / "lens.json").exists():
        linear = AffineLens.load(args.out / "linear", model)
        ridges = list(linear.meta["ridge"])
        dev_table = args.out / "linear_dev.json"
        dev_linear = json.loads(dev_table.read_text()) if dev_table.exists() else None
        print(f"linear lens: reusing {args.out / 'linear'} (ridge per layer chosen on dev: {ridges})")
    else:
        started = time.perf_counter()
        equations = NormalEquations.from_store(model, store, sites, rows["train"])
        timings["linear_normal_equations_s"] = time.perf_counter() - started
        candidates = {f"ridge={r:g}": equations.solve(r) for r in RIDGES}
        table = evaluate_lenses(model, store, candidates, sites, rows["dev"], compute_dtype=torch.bfloat16)
        best = table.loc[table.groupby("site")["kl"].idxmin()].set_index("site")
        ridges = [float(best.loc[site, "lens"].removeprefix("ridge=")) for site in sites]
        dev_linear = table.to_dict("records")
        write_json(args.out / "linear_dev.json", dev_linear)
        linear = equations.solve(ridges)
        linear.save(args.out / "linear")
        print("linear lens: ridge per layer chosen on dev:", ridges)

    # Tuned lens: optimizer and learning rate on dev, with every fourth layer.
    def tuned_config(out: Path, optimizer: str, lr: float, steps: int, layers: str) -> LensTrainConfig:
        return LensTrainConfig(store=store.root, lens="tuned", out=out, holdout=holdout, steps=steps, batch_size=batch,
                               optimizer=optimizer, lr=lr, warmup=max(1, steps // 10), layers=layers, resume=True)

    dev_scores = {}
    every_fourth = ",".join(str(layer) for layer in range(0, model.cfg.n_layers, 4))
    for optimizer, lr in TUNED_GRID:
        name = f"{optimizer} lr={lr:g}"
        folder = args.out / "dev" / name.replace(" ", "_")
        lens = train_tuned_lens(tuned_config(folder, optimizer, lr, args.dev_steps, every_fourth), model=model)
        if not (folder / "dev_kl.json").exists():
            table = evaluate_lenses(model, store, {name: lens}, lens.sites, rows["dev"], compute_dtype=torch.bfloat16)
            write_json(folder / "dev_kl.json", {"mean_kl": float(table.kl.mean()), "per_site": table.to_dict("records")})
        dev_scores[name] = json.loads((folder / "dev_kl.json").read_text())["mean_kl"]
        print(f"tuned lens dev: {name}: mean KL over layers {dev_scores[name]:.4f}")
    optimizer, lr = min(TUNED_GRID, key=lambda c: dev_scores[f"{c[0]} lr={c[1]:g}"])
    started = time.perf_counter()
    tuned = train_tuned_lens(tuned_config(args.out / "tuned", optimizer, lr, args.steps, "all"), model=model)
    timings["tuned_train_s"] = tuned.meta["train_seconds"]
    timings["tuned_wall_s"] = time.perf_counter() - started

    # Test tokens. The unembedding matmuls run in bfloat16 (float32 costs 10x on this CPU); the same
    # evaluation in float32 on the first --check-contexts test contexts bounds the difference.
    lenses = {"logit": None, "tuned": tuned, "linear": linear}
    test_tokens = rows["test"][1] - rows["test"][0]
    saved = pd.read_csv(args.out / "kl.csv") if (args.out / "kl.csv").exists() else None
    if saved is not None and int(saved.tokens.iloc[0]) == test_tokens and set(saved.lens) == set(lenses):
        table = saved  # this evaluation was finished by an earlier run
        print(f"reusing {args.out / 'kl.csv'} ({test_tokens:,} test tokens)")
    else:
        started = time.perf_counter()
        table = evaluate_lenses(model, store, lenses, sites, rows["test"], compute_dtype=torch.bfloat16)
        timings["test_evaluation_s"] = time.perf_counter() - started
        table.to_csv(args.out / "kl.csv", index=False)
    check_rows = (rows["test"][0], rows["test"][0] + args.check_contexts * int(store.manifest["rows_per_context"]))
    low = evaluate_lenses(model, store, lenses, sites, check_rows, compute_dtype=torch.bfloat16).set_index(["lens", "site"])
    exact = evaluate_lenses(model, store, lenses, sites, check_rows).set_index(["lens", "site"])
    timings["bf16_vs_fp32_max_rel_kl_diff"] = float(((low.kl - exact.kl).abs() / exact.kl).max())
    timings["bf16_vs_fp32_max_abs_kl_diff"] = float((low.kl - exact.kl).abs().max())
    print(f"bfloat16 against float32 evaluation on {args.check_contexts} test contexts: largest KL difference "
          f"{timings['bf16_vs_fp32_max_abs_kl_diff']:.2e} nats ({timings['bf16_vs_fp32_max_rel_kl_diff']:.2e} relative)")
    choices = {"ridges": ridges, "dev_linear": dev_linear, "tuned_dev_mean_kl": dev_scores,
               "tuned": {"optimizer": optimizer, "lr": lr, "steps": args.steps, "batch_size": batch},
               "splits": rows, "timings": timings, "cpu_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    write_json(args.out / "choices.json", choices)
    write_figures(args.out / "kl.html", [kl_figure(table, "SmolLM2-135M, test tokens: KL(final || lens) per layer")], "lens KL")
    wide = table.pivot(index="layer", columns="lens", values=["kl", "precision_at_1", "surprisal"])
    print(f"\ntest tokens: {int(table.tokens.iloc[0]):,}; tuned lens: {optimizer} lr={lr:g}, {args.steps} steps of {batch} tokens")
    print(wide.round(3).to_string())
    print("\nmean over layers:")
    print(table.groupby("lens")[["kl", "precision_at_1", "surprisal"]].mean().round(4).to_string())
    print(f"wrote {args.out}/kl.csv, kl.html, choices.json")


if __name__ == "__main__":
    main()
