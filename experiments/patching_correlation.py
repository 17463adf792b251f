"""How well do attribution patching and RelP agree with activation patching? (IOI, embedded model)

    python experiments/patching_correlation.py [--prompts 16] [--template 0] [--out runs/patching_correlation]

Runs the full activation-patching sweep (denoising; resid_pre, attn_out and mlp_out by layer x
position) as the reference, then attribution patching and RelP under several rule combinations
on the same cells, and prints the Pearson correlation with the reference per component type.
The RelP paper (arXiv 2508.21258) reports on GPT-2 small: residual 0.75 -> 0.97, attention
0.98 -> 0.96, MLP 0.20 -> 0.99 (attribution patching -> RelP).
Writes correlations.json, the three cell tables (CSV) and heatmaps (HTML) to --out.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

RULE_SETS = ["ln", "identity", "half", "ln,identity", "ln,half", "ln,identity,half", "ln,identity,half,attention"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--template", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "patching_correlation")
    args = parser.parse_args()

    import interp
    from interp.patching import DEFAULT_KINDS, Rules, activation_patching, attribution_patching, ioi_task

    model = interp.load_model("smollm2-135m")
    task = ioi_task(model, args.prompts, template=args.template)
    print(task.summary())
    reference = activation_patching(model, task)
    results = {"attribution patching": attribution_patching(model, task)}
    for rules in RULE_SETS:
        results[f"RelP [{rules}]"] = attribution_patching(model, task, rules=Rules.parse(rules))
    table = {name: {kind: result.correlation(reference, kind) for kind in DEFAULT_KINDS} for name, result in results.items()}

    print(f"\nPearson correlation with activation patching ({len(reference.table)} cells, {args.prompts} prompts)")
    print(f"{'method':42s}" + "".join(f"{k:>12s}" for k in DEFAULT_KINDS) + f"{'seconds':>10s}")
    for name, row in table.items():
        print(f"{name:42s}" + "".join(f"{row[k]:12.3f}" for k in DEFAULT_KINDS) + f"{results[name].seconds:10.2f}")
    print(f"{'activation patching (reference)':42s}" + " " * 12 * len(DEFAULT_KINDS) + f"{reference.seconds:10.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "correlations.json").write_text(json.dumps(
        {"task": task.summary(), "cells": len(reference.table), "correlations": table,
         "seconds": {**{n: r.seconds for n, r in results.items()}, "activation patching": reference.seconds}}, indent=1))
    for name, result in [("activation", reference), ("attribution", results["attribution patching"]),
                         ("relp", results["RelP [ln,identity,half]"])]:
        result.table.to_csv(args.out / f"{name}.csv", index=False)
        result.heatmap().write_html(args.out / f"{name}.html", include_plotlyjs="directory")  # plotly.min.js beside it: works offline
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
