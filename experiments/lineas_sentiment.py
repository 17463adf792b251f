"""Sentiment steering on SmolLM2-135M: LinEAS vs Mean-AcT vs Linear-AcT vs difference-in-means.

    python experiments/lineas_sentiment.py [--out runs/lineas-sentiment] [--threads 1]

1. Texts: 32 negative and 32 positive sentences of the built-in sentiment concept (a seeded draw;
   the maps move negative towards positive). Maps at ``blocks.{2..9}.hook_resid_post`` (8 layers,
   ending at layer 9, the difference-in-means layer chosen on the development prompts in the
   steering issue). LinEAS uses the ``interp lineas fit`` defaults (steps, lr, group strength),
   chosen on development prompts (``neutral_dev``) by hand before this run.
2. Held-out report on ``neutral_test`` (60 prompts), greedy, 40 new tokens: every method at
   strengths 0.5 and 1 (lambda for the maps; multiples of the layer's mean activation norm
   for difference-in-means), mean VADER compound and perplexity under the unsteered model.
   Table, plot (score vs perplexity) and generations in ``OUT/test``; units changed per method and
   the fit times in ``OUT/summary.json``. Every stage resumes from what ``OUT`` holds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/lineas-sentiment"))
    parser.add_argument("--layers", default="2-9")
    parser.add_argument("--strengths", default="0.5,1")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import interp
    from interp.cli import parse_layers
    from interp.data.concepts import load_concept, load_prompts
    from interp.steering import AffineMaps, VaderScorer, diff_in_means, fit_maps, site_mean_norm, sweep
    from interp.steering.lineas_job import LineasFitConfig

    model = interp.load_model("smollm2-135m")
    defaults = LineasFitConfig(out=args.out)
    source, target = defaults.texts()
    sites = [model.site("resid_post", layer) for layer in parse_layers(args.layers, model.cfg.n_layers)]
    maps, fit_seconds = {}, {}
    for method in ("lineas", "mean-act", "linear-act"):
        path = args.out / "maps" / f"{method}.safetensors"
        if path.is_file():
            maps[method] = AffineMaps.load(path)
        else:
            start = time.perf_counter()
            maps[method] = fit_maps(model, method, source, target, sites, steps=defaults.steps, lr=defaults.lr,
                                    l1=defaults.l1, group=defaults.group, seed=defaults.seed)
            maps[method].info["seconds"] = time.perf_counter() - start
            maps[method].save(path)
        fit_seconds[method] = maps[method].info.get("seconds")
        print(f"{method}: {sum(maps[method].active_units().values())} of {len(sites) * model.cfg.d_model} units changed, "
              f"fit {fit_seconds[method]:.0f} s")
    concept = load_concept("sentiment")
    last = sites[-1]
    vector = diff_in_means(model, concept, last)
    norm = site_mean_norm(model, last, concept.texts)
    prompts = load_prompts("neutral_test")
    strengths = [float(v) for v in args.strengths.split(",")]
    result = sweep(model, {"diff-means": vector, **maps}, strengths, prompts, scorer=VaderScorer(), mean_norms={last: norm},
                   max_new_tokens=args.new_tokens, out=args.out / "test")
    summary = {"sites": sites, "n_source": len(source), "n_target": len(target), "diff_means_site": last, "mean_norm": norm,
               "units_changed": {m: sum(v.active_units().values()) for m, v in maps.items()}, "units_total": len(sites) * model.cfg.d_model,
               "fit_seconds": fit_seconds, "lineas": {k: getattr(defaults, k) for k in ("steps", "lr", "l1", "group")},
               "n_test_prompts": len(prompts)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(result.table.drop(columns=["tokens"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}/test/table.csv, sweep.html, generations.jsonl; {args.out}/summary.json")


if __name__ == "__main__":
    main()
