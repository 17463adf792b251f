"""Steering with SNMF features against difference-in-means, SAE latents and random directions (SmolLM2).

    python experiments/snmf_steering.py --snmf runs/snmf-L12/level0-k100 [--sae SAE_FOLDER]
        [--concepts sentiment,wedding,space,war] [--kl-targets 1] [--families snmf,diff-means,sae,random] [--out runs/snmf-steering]

Every direction lives at the SNMF's site, ``blocks.L.mlp.hook_post`` (the MLP hidden activation):

- ``snmf``: a feature's unit ``z`` (the paper's intervention); the candidates are the ``--candidates``
  features whose mean coefficient over a text's tokens separates the concept's positive texts from
  its negative ones best (effect size), and the one steering best on the *development* prompts wins;
- ``sae``: an SAE trained on the same site (``--sae``), its latents ranked and chosen the same way;
- ``diff-means``: the mean activation of the concept's positive texts minus that of its negative
  texts (last token, the library default);
- ``random``: a seeded random unit direction (the same for every concept).

Matched strength: for each direction and each KL target, the added norm is found by bisection so
that the mean KL(unsteered || steered) of the next-token distribution after the first
``--calibration-prompts`` development prompts equals the target; the same norm is then used on the test prompts. Generations are greedy
(``--new-tokens``); the concept score is VADER's compound for sentiment and concept words per 100
words for topics (``data/concepts/<name>.words.txt``); fluency is the perplexity of the
continuations under the unsteered model. Selection (the SNMF feature, the SAE latent, and each
method's KL target) uses the development prompts (``neutral_dev``) only: the candidate with the
highest mean development score over the targets among runs whose perplexity stays within
``--max-ppl-ratio`` x the unsteered one; the report is on ``neutral_test``.
Writes ``OUT/<concept>/{dev,test}/`` (sweep folders) and ``norms-<direction>.json``, all reused
when run again (so ``--families`` may split the work over several processes sharing ``OUT``; a
last run with every family assembles them), ``OUT/results.json``, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch


@torch.no_grad()
def next_token_kl(model, tokens, base_logp, site: str, direction: torch.Tensor, norm: float) -> float:
    """Mean KL(unsteered || steered) of the next token after each prompt, ``norm``·direction added at ``site``."""
    from interp.intervene import Add

    with model.intervene(Add(site, direction, scale=norm)):
        logits = model(tokens)
    logp = torch.log_softmax(logits[torch.arange(len(logits)), tokens.real().sum(1) - 1].float(), -1)
    return float((base_logp.exp() * (base_logp - logp)).sum(-1).mean())


def matched_norms(model, prompts: list[str], site: str, direction: torch.Tensor, targets: list[float],
                  start: float, steps: int = 7) -> dict[float, float]:
    """For each KL target, the added norm whose mean next-token KL on ``prompts`` hits it: doubling until
    the target is passed, then bisection in log norm (``steps`` halvings of a factor 2: within 0.6%)."""
    tokens = model.tokenize(prompts, padding_side="right")
    with torch.no_grad():
        logits = model(tokens)
    base = torch.log_softmax(logits[torch.arange(len(logits)), tokens.real().sum(1) - 1].float(), -1)

    def kl(norm: float) -> float:
        return next_token_kl(model, tokens, base, site, direction, norm)

    out, lo, hi = {}, 0.0, start
    for target in sorted(targets):  # KL grows with the norm: each target's search starts where the last ended
        while kl(hi) < target:
            lo, hi = hi, hi * 2
            if hi > 1e4 * start:
                raise RuntimeError(f"no norm up to {hi:g} reaches KL {target} at {site}")
        a, b = lo, hi
        while a == 0:  # the first target may be passed at the starting norm already: halve down to it
            a = b / 2 if kl(b / 2) < target else 0.0
            b = b if a else b / 2
        for _ in range(steps):
            mid = math.sqrt(a * b)
            a, b = (mid, b) if kl(mid) < target else (a, mid)
        out[target] = math.sqrt(a * b)
        lo, hi = a, b
    return out


def effect_sizes(acts: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """(mean over positives − mean over negatives) / pooled std, per column."""
    y = torch.tensor(labels)
    pos, neg = acts[y == 1], acts[y == 0]
    return (pos.mean(0) - neg.mean(0)) / ((pos.var(0) + neg.var(0)) / 2).sqrt().clamp_min(1e-6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--snmf", type=Path, required=True, help="a fitted SNMF level folder (interp snmf --out OUT -> OUT/level0-kK)")
    parser.add_argument("--sae", type=Path, default=None, help="an SAE trained on the same site (optional)")
    parser.add_argument("--concepts", default="sentiment,wedding,space,war")
    parser.add_argument("--kl-targets", default="1", help="next-token KL (nats) that every direction is matched to")
    parser.add_argument("--candidates", type=int, default=2, help="SNMF features / SAE latents tried on the dev prompts")
    parser.add_argument("--max-ppl-ratio", type=float, default=2.0)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--calibration-prompts", type=int, default=10, help="first N dev prompts the KL is measured on")
    parser.add_argument("--families", default="snmf,diff-means,sae,random", help="directions to compare (sae needs --sae)")
    parser.add_argument("--no-save-results", dest="save_results", action="store_false",
                        help="leave OUT/results.json alone (for partial runs: several may share OUT)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/snmf-steering"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import interp
    from interp.data.concepts import load_concept, load_prompts
    from interp.dictionary import load_dictionary
    from interp.probes import concept_activations
    from interp.snmf import SNMF
    from interp.steering import SteeringVector, concept_latents, diff_in_means, latent_vector, make_scorer, sweep

    model = interp.load_model("smollm2-135m")
    snmf = SNMF.load(args.snmf)
    site = snmf.site
    sae = load_dictionary(args.sae) if args.sae else None
    if sae is not None and sae.config.input_site != site:
        raise SystemExit(f"the SAE reads {sae.config.input_site}, the SNMF {site}: steer both at one site")
    targets = [float(t) for t in args.kl_targets.split(",")]
    wanted = [f for f in args.families.split(",") if f != "sae" or sae is not None]
    dev, test = load_prompts("neutral_dev"), load_prompts("neutral_test")
    common = dict(units="absolute", max_new_tokens=args.new_tokens, progress=False)
    results: dict = {"site": site, "snmf": str(args.snmf), "sae": str(args.sae) if args.sae else None, "kl_targets": targets,
                     "new_tokens": args.new_tokens, "concepts": {}}

    for name in args.concepts.split(","):
        concept = load_concept(name)
        scorer = make_scorer("auto", concept)
        folder = args.out / name
        scale: list[float] = []  # the concept texts' mean activation norm: where the norm search starts

        def norms_for(label: str, v: SteeringVector) -> dict[float, float]:
            """Matched norms per KL target, cached in ``norms-<label>.json`` (one file per direction: runs may overlap)."""
            path = folder / f"norms-{label}.json"
            cached = json.loads(path.read_text()) if path.exists() else {}
            key = f"{float(v.vector.sum()):.6g}:{args.calibration_prompts}"
            if key not in cached or set(cached[key]) != {str(t) for t in targets}:
                if not scale:
                    scale.append(float(concept_activations(model, concept.texts, [site], reduce="mean")[site].norm(dim=1).mean()))
                found = matched_norms(model, dev[: args.calibration_prompts], site, v.direction, targets, 0.1 * scale[0])
                cached[key] = {str(t): n for t, n in found.items()}
                folder.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cached, indent=1))
            return {float(t): n for t, n in cached[key].items()}

        def run(split: str, label: str, v: SteeringVector) -> pd.DataFrame:
            """Generations at every KL target; one row per target (score, perplexity, distinct2)."""
            prompts = dev if split == "dev" else test
            rows = []
            for target, norm in norms_for(label, v).items():
                table = sweep(model, {label: v}, [norm], prompts, scorer=scorer, out=folder / split, **common).table
                base = table[table["method"] == "unsteered"].iloc[0]
                row = table[table["method"] == label].iloc[0]
                rows.append({"method": label, "kl_target": target, "added_norm": norm, "score": float(row["score"]),
                             "score_sem": float(row["score_sem"]), "perplexity": float(row["perplexity"]),
                             "distinct2": float(row["distinct2"]), "unsteered_score": float(base["score"]),
                             "unsteered_perplexity": float(base["perplexity"])})
            return pd.DataFrame(rows)

        def within_bound(table: pd.DataFrame) -> pd.DataFrame:
            return table[table["perplexity"] <= args.max_ppl_ratio * table["unsteered_perplexity"]]

        # candidates: SNMF features and SAE latents by effect size on the concept's texts, chosen on dev
        families: dict[str, list[tuple[str, SteeringVector]]] = {}
        if "snmf" in wanted:
            coefficients = concept_activations(model, concept.texts, [site], reduce="mean", transform=snmf.coefficients)[site]
            ranked = effect_sizes(coefficients, concept.labels).argsort(descending=True)[: args.candidates].tolist()
            families["snmf"] = [(f"snmf-f{f}", SteeringVector(site, snmf.Z[:, f], "snmf", {"feature": f})) for f in ranked]
        if "sae" in wanted:
            latents = concept_latents(model, sae, concept, top=args.candidates)["latent"].tolist()
            families["sae"] = [(f"sae-l{i}", latent_vector(sae, int(i))) for i in latents]
        chosen, dev_tables = {}, []
        for family, candidates in families.items():
            scored = []
            for label, v in candidates:
                table = run("dev", label, v)
                dev_tables.append(table)
                ok = within_bound(table)
                scored.append((float(ok["score"].mean()) if len(ok) else -math.inf, label, v))
            best = max(scored, key=lambda s: s[0])
            chosen[family] = (best[1], best[2])
        if "diff-means" in wanted:
            chosen["diff-means"] = ("diff-means", diff_in_means(model, concept, site))
        if "random" in wanted:
            g = torch.Generator().manual_seed(1000)  # one seeded random direction, the same for every concept
            chosen["random"] = ("random", SteeringVector(site, torch.randn(snmf.d, generator=g), "random"))
        if len(targets) > 1:  # the strength (KL target) of these two is chosen on dev too
            dev_tables += [run("dev", *chosen[f]) for f in ("diff-means", "random") if f in chosen]
        dev_all = pd.concat(dev_tables) if dev_tables else pd.DataFrame(columns=["method"])
        test_tables = []
        for family, (label, v) in chosen.items():
            table = run("test", label, v)
            table.insert(0, "family", family)
            mine = dev_all[dev_all["method"] == label]
            if len(targets) > 1:
                best = (within_bound(mine) if len(within_bound(mine)) else mine).sort_values("score").iloc[-1]
                table["dev_chosen"] = table["kl_target"] == best["kl_target"]
            else:
                table["dev_chosen"] = True
            test_tables.append(table)
        test_all = pd.concat(test_tables, ignore_index=True)
        cosines = {a: {b: round(float(va.direction @ vb.direction), 3) for b, (_, vb) in chosen.items()} for a, (_, va) in chosen.items()}
        results["concepts"][name] = {"scorer": scorer.description, "candidates": {f: [c[0] for c in cs] for f, cs in families.items()},
                                     "chosen": {f: label for f, (label, _) in chosen.items()}, "cosines": cosines,
                                     "dev": dev_all.to_dict("records"), "test": test_all.to_dict("records")}
        print(f"\n## {name} ({scorer.description}); chosen on dev: {results['concepts'][name]['chosen']}")
        print(test_all.drop(columns=["score_sem"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"), flush=True)

    if not args.save_results:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print_summary(results)
    print(f"wrote {args.out / 'results.json'}")


def print_summary(results: dict) -> None:
    """Markdown: per concept and KL target, score (perplexity) per family on the test prompts; then the mean gain."""
    families = ["snmf", "diff-means", "sae", "random"]
    rows, gains = [], {}
    for name, entry in results["concepts"].items():
        test = pd.DataFrame(entry["test"])
        for target, g in test.groupby("kl_target"):
            cells = []
            for family in families:
                r = g[g["family"] == family]
                if len(r):
                    r = r.iloc[0]
                    mark = "*" if r["dev_chosen"] else ""
                    cells.append(f"{r['score']:.3f}{mark} ({r['perplexity']:.1f})")
                    gains.setdefault((family, target), []).append(r["score"] - r["unsteered_score"])
                else:
                    cells.append("–")
            base = g.iloc[0]
            rows.append(f"| {name} | {target:g} | {base['unsteered_score']:.3f} ({base['unsteered_perplexity']:.1f}) | " + " | ".join(cells) + " |")
    print("\n| concept | KL target | unsteered | " + " | ".join(families) + " |")
    print("|---|---|---|" + "---|" * len(families))
    print("\n".join(rows))
    print("\nmean score gain over unsteered across concepts (sentiment in VADER units, topics in words per 100):")
    for (family, target), values in sorted(gains.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  KL {target:g} {family:11s} {np.mean(values):+.3f}  ({', '.join(f'{v:+.2f}' for v in values)})")


if __name__ == "__main__":
    main()
