"""Where does RelP lose faithfulness on the embedded model? (development split only)

    python experiments/relp_diagnosis.py [--split dev] [--tasks ioi,factual] [--prompts ioi=4,factual=6]

Reuses the activation-patching references of ``patching_correlation.py`` (same --out folder;
computed there if missing). For every template of the split:
- Pearson correlation with activation patching per component for attribution patching, each RelP
  rule alone, the first default without each of its rules, the final norm with and without the
  LN-rule, the gate of SwiGLU (half rule vs signal-take-all), the attention rule, and the QK fix
  (AtP*, and RelP's gradients with the QK fix);
- for the chosen rule sets: the squared gap to activation patching per layer (thirds of the model)
  and per token role (the answer's token, the competing token, other tokens that differ between
  clean and corrupt prompts, the last position, everything else), as a share of the total.
Rules may be chosen on the dev split only; report the test split with patching_correlation.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from patching_correlation import prompt_counts, reference  # noqa: E402

KINDS = ("resid_pre", "attn_out", "mlp_out")
RULE_SETS = ["ln", "identity", "half", "ln,identity,half", "ln_blocks,identity,half", "ln,identity,signal"]
BREAKDOWN = ["ln,identity,half"]


def variants(extra: list[str]) -> dict:
    from interp.patching import Rules, atp_star, attribution_patching

    out = {"attribution patching": lambda m, t: attribution_patching(m, t), "AtP*": lambda m, t: atp_star(m, t)}
    for rules in RULE_SETS + extra:
        out[f"RelP [{rules}]"] = lambda m, t, rules=rules: attribution_patching(m, t, rules=Rules.parse(rules))
    for rules in ["ln,identity,half"] + extra:
        out[f"RelP [{rules}] + QK fix"] = lambda m, t, rules=rules: atp_star(m, t, rules=Rules.parse(rules))
    return out


def roles(model, task) -> list[str]:
    """A role for every position, from the first prompt pair."""
    clean, corrupt = task.clean.ids[0].tolist(), task.corrupt.ids[0].tolist()
    answer, wrong = int(task.answer[0]), int(task.wrong[0])
    out = []
    for position, (c, k) in enumerate(zip(clean, corrupt, strict=True)):
        if position == len(clean) - 1:
            out.append("last")
        elif c != k and c == answer:
            out.append("answer token")
        elif c != k and c == wrong:
            out.append("competing token")
        elif c != k:
            out.append("other changed")
        else:
            out.append("unchanged")
    return out


def gaps(ref, result, model, task) -> dict:
    """Share of the squared gap per component by layer third and by token role, and the Pearson
    correlation without the first block (whose MLP output at a changed token carries most of that
    token's identity: patching it is far from the linear regime)."""
    keys = ["kind", "layer", "position", "head"]
    both = ref.table.merge(result.table, on=keys, suffixes=("_ref", "_est"))
    both["gap2"] = (both.score_est - both.score_ref) ** 2
    both["role"] = [roles(model, task)[p] for p in both.position]
    third = model.cfg.n_layers / 3
    both["layers"] = [f"L{int(i * third)}-{int((i + 1) * third) - 1}" for i in (both.layer // third).astype(int)]
    out = {}
    for kind in KINDS:
        part = both[both.kind == kind]
        total = float(part.gap2.sum()) or 1.0
        out[kind] = {"total": total,
                     "by layers": (part.groupby("layers").gap2.sum() / total).round(3).to_dict(),
                     "by role": (part.groupby("role").gap2.sum() / total).round(3).to_dict(),
                     "by layer": (part.groupby("layer").gap2.sum() / total).round(3).to_dict(),
                     "pearson without block 0": float(np.corrcoef(part[part.layer > 0].score_ref, part[part.layer > 0].score_est)[0, 1])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="dev")
    parser.add_argument("--tasks", default="ioi,factual")
    parser.add_argument("--templates", default="", help="comma-separated template numbers (default: all of the split)")
    parser.add_argument("--prompts", default="ioi=4,factual=6")
    parser.add_argument("--rules", default="", help="extra rule sets, separated by ';'")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "patching_correlation")
    args = parser.parse_args()
    if args.split == "test":
        print("note: rules must not be chosen on the test split; this runs the diagnosis there only to report it")

    import interp
    from interp.patching import TASKS, templates

    model = interp.load_model("smollm2-135m")
    extra = [r for r in args.rules.split(";") if r]
    methods = variants(extra)
    prompts = prompt_counts(args.prompts)
    correlations, breakdowns = {}, {}
    for task_name in args.tasks.split(","):
        numbers = [int(t) for t in args.templates.split(",")] if args.templates else range(len(templates(task_name, args.split)))
        for t in numbers:
            task = TASKS[task_name](model, prompts[task_name], template=t, split=args.split)
            ref = reference(model, task, args.out / f"{task_name}-{args.split}-{t}")
            name = f"{task_name} {t}"
            results = {m: fn(model, task) for m, fn in methods.items()}
            correlations[name] = {m: {k: r.correlation(ref, k) for k in KINDS} for m, r in results.items()}
            breakdowns[name] = {m: gaps(ref, results[m], model, task) for m in
                                ["attribution patching", "AtP*"] + [f"RelP [{r}]" for r in BREAKDOWN + extra]
                                + [f"RelP [{r}] + QK fix" for r in BREAKDOWN]}
            print(f"{task.summary()}", flush=True)
            for m, row in correlations[name].items():
                print(f"  {m:44s}" + "".join(f"{row[k]:8.3f}" for k in KINDS), flush=True)

    print(f"\n{args.split} split: mean Pearson correlation with activation patching over {len(correlations)} templates")
    print(f"{'method':44s}" + "".join(f"{k:>11s}" for k in KINDS))
    for m in methods:
        print(f"{m:44s}" + "".join(f"{np.mean([c[m][k] for c in correlations.values()]):11.3f}" for k in KINDS))
    for m in next(iter(breakdowns.values())):
        print(f"\nsquared gap of {m}, share by token role, by layer third and in block 0; Pearson without block 0 (means over templates)")
        for k in KINDS:
            shares = [b[m][k] for b in breakdowns.values()]
            role = {r: np.mean([s["by role"].get(r, 0.0) for s in shares]) for r in sorted({r for s in shares for r in s["by role"]})}
            third = {r: np.mean([s["by layers"].get(r, 0.0) for s in shares]) for r in sorted({r for s in shares for r in s["by layers"]},
                                                                                             key=lambda x: int(x[1:].split("-")[0]))}
            first = np.mean([s["by layer"].get(0, s["by layer"].get("0", 0.0)) for s in shares])
            pearson = np.mean([s["pearson without block 0"] for s in shares])
            print(f"  {k:10s} " + "  ".join(f"{r} {v:.2f}" for r, v in role.items()) + "  |  " + "  ".join(f"{r} {v:.2f}" for r, v in third.items())
                  + f"  |  block 0 {first:.2f}  |  Pearson without block 0 {pearson:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"diagnosis-{args.split}.json"
    path.write_text(json.dumps({"correlations": correlations, "breakdowns": breakdowns}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
