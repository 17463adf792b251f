"""How well do attribution patching, AtP* and RelP agree with activation patching? (embedded model)

    python experiments/patching_correlation.py --split dev [--tasks ioi,factual] [--prompts ioi=4,factual=6] [--out runs/patching_correlation]
    python experiments/patching_correlation.py --split test

For each template of the chosen split (``data/ioi.json`` and ``data/facts.json``:
``original`` = the five IOI templates the first RelP defaults were chosen on, ``dev`` = held-out
templates that rules may be chosen on, ``test`` = held-out templates for reporting only), runs the
full activation-patching sweep (denoising; resid_pre, attn_out and mlp_out by layer x position) as
the reference, then each estimator on the same cells, and prints the Pearson correlation with the
reference per template and component, then the mean per split. The reference sweep is the slow
part: it is kept under --out/<task>-<split>-<template>/activation.csv and reused by later runs
(delete the folder to recompute), so a killed run resumes where it stopped.
Writes per template: correlations.json and each estimator's cells (CSV).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd

warnings.filterwarnings("ignore")

FIRST_DEFAULT_RULES = "ln,identity,half"  # the RelP default before issue 19, chosen on the 'original' split


def estimators(extra_rules: list[str]) -> dict:
    """name -> function(model, task) -> PatchingResult."""
    from interp.patching import Rules, atp_star, attribution_patching

    methods = {
        "attribution patching": lambda m, t: attribution_patching(m, t),
        "AtP*": lambda m, t: atp_star(m, t),
        f"RelP [{FIRST_DEFAULT_RULES}] (before)": lambda m, t: attribution_patching(m, t, rules=Rules.parse(FIRST_DEFAULT_RULES)),
        "RelP [default]": lambda m, t: attribution_patching(m, t, rules=Rules()),
        "RelP [default] + QK fix": lambda m, t: atp_star(m, t, rules=Rules()),
    }
    for rules in extra_rules:
        methods[f"RelP [{rules}]"] = lambda m, t, rules=rules: attribution_patching(m, t, rules=Rules.parse(rules))
    return methods


def reference(model, task, folder: Path):
    """The activation-patching sweep of ``task``, from folder/activation.csv when an earlier run left it."""
    from interp.patching import PatchingResult, activation_patching

    path, meta = folder / "activation.csv", folder / "activation.json"
    if path.exists() and meta.exists() and json.loads(meta.read_text())["task"] == task.summary():
        info = json.loads(meta.read_text())
        return PatchingResult("activation", "denoising", task.name, pd.read_csv(path), task.position_labels(model),
                              task.clean_value, task.corrupt_value, info["seconds"])
    result = activation_patching(model, task, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    result.table.to_csv(path.with_suffix(".tmp"), index=False)
    path.with_suffix(".tmp").rename(path)
    meta.write_text(json.dumps({"task": task.summary(), "seconds": result.seconds}))
    return result


def one_template(model, task_name: str, split: str, template: int, prompts: int, methods: dict, out: Path) -> dict:
    from interp.patching import DEFAULT_KINDS, TASKS

    task = TASKS[task_name](model, prompts, template=template, split=split)
    folder = out / f"{task_name}-{split}-{template}"
    start = time.perf_counter()
    ref = reference(model, task, folder)
    print(f"\n{task.summary()}  (reference {time.perf_counter() - start:.0f} s)", flush=True)
    results = {name: fn(model, task) for name, fn in methods.items()}
    table = {name: {kind: r.correlation(ref, kind) for kind in DEFAULT_KINDS} for name, r in results.items()}
    print(f"{'method':44s}" + "".join(f"{k:>11s}" for k in DEFAULT_KINDS) + f"{'seconds':>9s}")
    for name, row in table.items():
        print(f"{name:44s}" + "".join(f"{row[k]:11.3f}" for k in DEFAULT_KINDS) + f"{results[name].seconds:9.2f}")
    for name, result in results.items():
        result.table.to_csv(folder / f"{name.split(' [')[0].split(' (')[0].replace(' ', '_').replace('*', 'star')}"
                                      f"{'' if '[' not in name else '-' + name.split('[')[1].split(']')[0].replace(',', '+')}.csv",
                            index=False)
    (folder / "correlations.json").write_text(json.dumps(
        {"task": task.summary(), "cells": len(ref.table), "correlations": table,
         "seconds": {**{n: r.seconds for n, r in results.items()}, "activation patching": ref.seconds}}, indent=1))
    return table


def summary(tables: dict, title: str) -> dict:
    """Mean correlation per method and component over ``tables`` (template -> method -> kind -> r)."""
    from interp.patching import DEFAULT_KINDS

    names = list(next(iter(tables.values())))
    print(f"\n{title}: Pearson correlation with activation patching, mean over {len(tables)} templates (min in brackets)")
    print(f"{'method':44s}" + "".join(f"{k:>16s}" for k in DEFAULT_KINDS))
    means = {}
    for name in names:
        values = {k: [t[name][k] for t in tables.values()] for k in DEFAULT_KINDS}
        means[name] = {k: sum(v) / len(v) for k, v in values.items()}
        print(f"{name:44s}" + "".join(f"{means[name][k]:9.3f} ({min(values[k]):4.2f})" for k in DEFAULT_KINDS))
    return means


def prompt_counts(text: str) -> dict[str, int]:
    """'ioi=4,factual=6' -> {'ioi': 4, 'factual': 6}; a bare number applies to every task."""
    if text.isdigit():
        return {"ioi": int(text), "factual": int(text)}
    return {name: int(n) for name, n in (part.split("=") for part in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="dev", help="original, dev or test (comma-separated for several)")
    parser.add_argument("--tasks", default="ioi,factual", help="ioi and/or factual")
    parser.add_argument("--templates", default="", help="comma-separated template numbers (default: every template of the split)")
    parser.add_argument("--prompts", default="ioi=4,factual=6", help="prompt pairs per template, per task")
    parser.add_argument("--rules", default="", help="extra RelP rule sets to compare, separated by ';' (e.g. 'ln;ln,identity')")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "patching_correlation")
    args = parser.parse_args()

    import interp
    from interp.patching import Rules, templates

    print(f"RelP default rules: {Rules()}")
    model = interp.load_model("smollm2-135m")
    methods = estimators([r for r in args.rules.split(";") if r])
    prompts = prompt_counts(args.prompts)
    report = {}
    for split in args.split.split(","):
        tables = {}
        for task_name in args.tasks.split(","):
            numbers = [int(t) for t in args.templates.split(",")] if args.templates else range(len(templates(task_name, split)))
            for t in numbers:
                tables[f"{task_name} {t}"] = one_template(model, task_name, split, t, prompts[task_name], methods, args.out)
        report[split] = {"per template": tables, "mean": summary(tables, f"{split} split")}
        for task_name in args.tasks.split(","):
            part = {k: v for k, v in tables.items() if k.startswith(task_name)}
            if part and len(args.tasks.split(",")) > 1:
                report[split][f"mean {task_name}"] = summary(part, f"{split} split, {task_name} only")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"summary-{args.split.replace(',', '+')}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
