"""How much CAFT's projection disturbs the base model, at the first position and after it.

    python experiments/caft_projection_check.py [--runs runs/caft] [--seeds 0,1,2]

For each seed's CAFT directions (``RUNS/directions-seed{s}.safetensors``, written by ``interp caft``)
and the random directions its control uses (``random_directions(..., seed=1000 + s)``), over the
task's training prompts on the *base* model (no training, a few forward passes):

- the share of each activation's squared norm that the projection removes, at position 0 (where
  SmolLM2 keeps its massive activations) and at the other positions;
- how far the projection moves the base model's answer (mean |change| of the logit difference
  " A" - " B" at the last token), projecting at every position and at every position but the first.

A large effect at position 0 that disappears when position 0 is left alone would make "any
projection disturbs the attention sink" a candidate explanation of random directions working.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("runs/caft"))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()

    import interp
    from interp.intervene import ProjectOut
    from interp.steering.caft import _answer_ids, answer_logits, load_directions, load_task, random_directions

    model = interp.load_model("smollm2-135m")
    task = load_task()
    ids = _answer_ids(model, task.answers)
    tokens = model.tokenize(task.train_texts()[:64], padding_side="right")
    real = tokens.real()
    rows = []
    with torch.no_grad():
        base = answer_logits(model, tokens, ids)
        for seed in [int(s) for s in args.seeds.split(",")]:
            path = args.runs / f"directions-seed{seed}.safetensors"
            if not path.is_file():
                continue
            pca = load_directions(path)
            for kind, dirs in (("pca", pca), ("random", random_directions(pca, seed=1000 + seed))):
                sites = list(dirs)
                acts = model.run_with_cache(tokens, sites, dtype=torch.float32, device="cpu")
                row = {"seed": seed, "directions": kind, "count": sum(d.shape[0] for d in dirs.values())}
                for site in sites:
                    basis = ProjectOut(site, dirs[site]).basis
                    x = acts[site]
                    removed = ((x @ basis) ** 2).sum(-1) / (x**2).sum(-1)
                    layer = site.split(".")[1]
                    row[f"L{layer}_removed_pos0"] = float(removed[:, 0].mean())
                    row[f"L{layer}_removed_rest"] = float(removed[:, 1:][real[:, 1:]].mean())
                for name, positions in (("all", None), ("from_pos1", slice(1, None))):
                    with model.intervene(*[ProjectOut(s, d, positions=positions) for s, d in dirs.items()]):
                        edited = answer_logits(model, tokens, ids)
                    change = (edited[:, 1] - edited[:, 0]) - (base[:, 1] - base[:, 0])
                    row[f"answer_shift_{name}"] = float(change.abs().mean())
                rows.append(row)
                print(json.dumps(row))
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "projection_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
