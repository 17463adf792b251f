"""Sentiment steering on SmolLM2-135M: LinEAS (dense and sparse) vs Mean-AcT vs Linear-AcT vs difference-in-means.

    python experiments/lineas_sentiment.py [--out runs/lineas-sentiment] [--stage maps|dev|test|all]

1. Maps (``--stage maps``): 32 negative and 32 positive sentences of the built-in sentiment concept
   (a seeded draw; the maps move negative towards positive) at ``blocks.{2..9}.hook_resid_post``
   (8 layers, ending at layer 9, the difference-in-means layer chosen on the development prompts
   in the steering issue). Mean-AcT, Linear-AcT, and LinEAS at every group-lasso strength of
   ``--groups`` (0 is the dense fit); each LinEAS fit writes its state every 10 steps and resumes.
2. Development (``--stage dev``): the 30 ``neutral_dev`` prompts, every LinEAS fit at lambda 1.
   The sparse fit reported is the strongest group strength whose VADER shift (over the unsteered
   run) keeps at least ``--keep`` (0.75) of the dense fit's shift; the rule was fixed before the run.
3. Test (``--stage test``): the 60 held-out ``neutral_test`` prompts, greedy, 40 new tokens: the
   dense and the chosen sparse LinEAS, Mean-AcT and Linear-AcT at lambda 0.25, 0.5, 0.75, 1 (and the
   fits of ``--also-test``, sparser points shown beside the choice, not chosen by it, at lambda 1);
   difference-in-means at layer 9 at 0.1, 0.25, 0.5 x the layer's mean activation norm. Mean
   VADER compound and perplexity under the unsteered model; table, generations and a plot in
   ``OUT/test``, the plot also as ``experiments/figures/lineas_sentiment.{html,png}``; units
   changed and fit times in ``OUT/summary.json``.

Every stage resumes from what ``OUT`` holds (fits from their state, generations per method and strength).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FIGURES = Path(__file__).resolve().parent / "figures"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/lineas-sentiment"))
    parser.add_argument("--stage", choices=("maps", "dev", "test", "report", "all"), default="all",
                        help="report: table and plot from the test generations on disk, without generating")
    parser.add_argument("--layers", default="2-9")
    parser.add_argument("--groups", default="0,0.2,0.4,0.8,1.6,3.2,6.4,12.8", help="LinEAS group-lasso strengths; 0 is the dense fit")
    parser.add_argument("--also-test", default="3.2", help="further group strengths to report on test (comma-separated; empty: none)")
    parser.add_argument("--keep", type=float, default=0.75, help="share of the dense fit's dev shift the sparse fit must keep")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import interp
    from interp.cli import parse_layers
    from interp.steering.lineas_job import LineasFitConfig

    model = interp.load_model("smollm2-135m")
    defaults = LineasFitConfig(out=args.out)
    source, target = defaults.texts()
    sites = [model.site("resid_post", layer) for layer in parse_layers(args.layers, model.cfg.n_layers)]
    groups = [float(g) for g in args.groups.split(",")]
    if 0.0 not in groups:
        raise SystemExit("--groups must include 0 (the dense fit)")
    maps = fit_all(model, source, target, sites, groups, defaults, args.out / "maps")
    if args.stage in ("dev", "test", "report", "all"):
        chosen = choose_on_dev(model, maps, groups, args)
    if args.stage in ("test", "all"):
        report_on_test(model, maps, chosen, sites, source, target, args)
    if args.stage == "report":
        write_report(maps, chosen, args)


def lineas_name(group: float) -> str:
    return f"lineas-g{group:g}"


def fit_all(model, source, target, sites, groups, defaults, folder: Path) -> dict:
    from interp.steering import AffineMaps, fit_maps

    maps = {}
    names = [(m, {}) for m in ("mean-act", "linear-act")]
    names += [(lineas_name(g), {"steps": defaults.steps, "lr": defaults.lr, "l1": defaults.l1, "group": g, "seed": defaults.seed,
                                "checkpoint": folder / f"{lineas_name(g)}.state.safetensors", "resume": True}) for g in groups]
    for name, kwargs in names:
        path = folder / f"{name}.safetensors"
        if path.is_file():
            maps[name] = AffineMaps.load(path)
        else:
            start = time.perf_counter()
            maps[name] = fit_maps(model, "lineas" if name.startswith("lineas") else name, source, target, sites, **kwargs)
            maps[name].info["seconds"] = time.perf_counter() - start  # of this process (a resumed fit: its last part)
            maps[name].save(path)
            Path(kwargs.get("checkpoint", folder / "none")).unlink(missing_ok=True)
        print(f"{name}: {sum(maps[name].active_units().values())} of {len(sites) * model.cfg.d_model} units changed, "
              f"fit {maps[name].info.get('seconds', float('nan')):.0f} s")
    return maps


def choose_on_dev(model, maps: dict, groups: list[float], args) -> str:
    """The strongest group strength whose dev shift keeps ``args.keep`` of the dense fit's."""
    from interp.data.concepts import load_prompts
    from interp.steering import VaderScorer, sweep

    fits = {lineas_name(g): maps[lineas_name(g)] for g in groups}
    result = sweep(model, fits, [1.0], load_prompts("neutral_dev"), scorer=VaderScorer(), max_new_tokens=args.new_tokens,
                   out=args.out / "dev", progress=False)
    table = result.table.set_index("method")
    base = float(table.loc["unsteered", "score"])
    dense = float(table.loc[lineas_name(0.0), "score"]) - base
    rows = []
    for g in groups:
        name = lineas_name(g)
        shift = float(table.loc[name, "score"]) - base
        rows.append({"group": g, "units": sum(maps[name].active_units().values()), "dev_shift": shift,
                     "dev_perplexity": float(table.loc[name, "perplexity"]), "keeps": shift >= args.keep * dense})
    dev = pd.DataFrame(rows)
    chosen = max(r["group"] for r in rows if r["keeps"])
    dev.to_csv(args.out / "dev" / "choice.csv", index=False)
    print(dev.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"dev (neutral_dev, {int(table.loc['unsteered', 'n'])} prompts): unsteered {base:.3f}, dense shift {dense:+.3f}; "
          f"chosen group strength {chosen:g}")
    return lineas_name(chosen)


def report_on_test(model, maps: dict, chosen: str, sites, source, target, args) -> None:
    """Generate on the test prompts, method by method in order of importance (each resumable), then report."""
    from interp.data.concepts import load_concept, load_prompts
    from interp.steering import VaderScorer, diff_in_means, site_mean_norm, sweep

    prompts = load_prompts("neutral_test")
    concept = load_concept("sentiment")
    last = sites[-1]
    norm = site_mean_norm(model, last, concept.texts)
    summary = {"sites": sites, "n_source": len(source), "n_target": len(target), "diff_means_site": last, "mean_norm": norm,
               "units_total": len(sites) * model.cfg.d_model, "chosen_on_dev": chosen,
               "fit_seconds": {name: m.info.get("seconds") for name, m in maps.items()}, "n_test_prompts": len(prompts)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, vector, strengths in test_plan(maps, chosen, args, lambda: diff_in_means(model, concept, last)):
        sweep(model, {name: vector}, strengths, prompts, scorer=VaderScorer(), mean_norms={last: norm},
              max_new_tokens=args.new_tokens, out=args.out / "test")
    write_report(maps, chosen, args)


def test_plan(maps: dict, chosen: str, args, diff_means=None) -> list:
    """(name, maps or vector, strengths) in the order they are generated: strength by strength
    (lambda 1 first), so that a run cut short still compares every method at the same strengths."""
    names = list(dict.fromkeys([lineas_name(0.0), chosen, "mean-act", "linear-act"]))
    plan = [(name, maps[name], (s,)) for s in (1.0, 0.5, 0.25, 0.75) for name in names]
    vector = diff_means() if diff_means else None
    plan += [("diff-means", vector, (s,)) for s in (0.25, 0.5, 0.1)]
    plan += [(lineas_name(float(g)), maps[lineas_name(float(g))], (1.0,)) for g in args.also_test.split(",") if g]
    return plan


def write_report(maps: dict, chosen: str, args) -> None:
    """Table and plot from the generations on disk (``--stage report`` draws them for a partial run)."""
    from interp.steering import VaderScorer
    from interp.steering.sweep import SweepResult, summarise

    folder = args.out / "test" / "generations"
    wanted = [("unsteered", 0.0)] + [(name, s) for name, _, strengths in test_plan(maps, chosen, args) for s in strengths]
    found = [(name, s) for name, s in wanted if (folder / f"{name}@{s:g}.jsonl").is_file()]
    missing = [f"{name}@{s:g}" for name, s in wanted if (name, s) not in found]
    generations = pd.concat([pd.read_json(folder / f"{name}@{s:g}.jsonl", lines=True) for name, s in found], ignore_index=True)
    result = SweepResult(summarise(generations), generations, VaderScorer.description)
    result.save(args.out / "test")
    units = {name: sum(m.active_units().values()) for name, m in maps.items()}
    table = result.table.drop(columns=["tokens", "added_norm"])
    table["units_changed"] = table["method"].map(units)
    table.to_csv(args.out / "test" / "table.csv", index=False)
    fig = result.plot()
    n = int(table["n"].iloc[0])
    # The transport methods all lie between perplexity 2.7 and 3.3; difference-in-means beyond 0.1 x the norm
    # would set the last panel's scale and hide them (the middle panel shows every point).
    fig.update_xaxes(range=[np.log10(2.6), np.log10(3.4)], row=1, col=3)
    fig.update_layout(title=f"Sentiment steering on {n} held-out prompts: maps at lambda, difference-in-means at x mean norm "
                            "(right: zoomed to perplexity 2.6-3.4)")
    FIGURES.mkdir(exist_ok=True)
    fig.write_html(FIGURES / "lineas_sentiment.html", include_plotlyjs="cdn")  # runs/.../test/sweep.html works offline
    try:
        fig.write_image(FIGURES / "lineas_sentiment.png", width=1400, height=460)
    except Exception as err:  # kaleido needs a Chromium (make browser)
        print(f"no PNG written ({err})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}/test/table.csv, sweep.html, generations.jsonl; {FIGURES}/lineas_sentiment.html, .png"
          + (f"; not generated yet: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
