"""Sentiment steering on SmolLM2-135M: difference-in-means, probe direction and SAE latent, swept over strengths.

    python experiments/steering_sentiment.py [--out runs/steering-sentiment] [--threads 1]

1. Development (``data/prompts/neutral_dev.txt``, 30 prompts): difference-in-means vectors at
   several layers and strengths; the layer is the one whose best strength raises the mean VADER
   compound most while keeping perplexity within ``--max-ppl-ratio`` times the unsteered one.
2. An SAE on that layer (``interp.dictionary.train``, harvesting the store if needed). Its
   ``--sae-candidates`` latents with the largest effect size on the sentiment texts (positive vs
   negative) are tried on the development prompts; the one with the largest VADER gain within the
   same perplexity bound gives the SAE direction. The logistic probe at that layer (trained on 75%
   of the sentiment texts) gives the probe direction.
3. Held-out report (``data/prompts/neutral_test.txt``, 60 prompts): every direction at every
   strength of ``--strengths`` (units: multiples of the layer's mean activation norm), greedy
   decoding; table, plot and generations in ``OUT/test``.
Every stage resumes from what ``OUT`` already holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/steering-sentiment"))
    parser.add_argument("--dev-layers", default="3,6,9,12,15")
    parser.add_argument("--dev-strengths", default="0.25,0.5,0.75")
    parser.add_argument("--strengths", default="-0.75,-0.5,-0.25,0.25,0.5,0.75,1")
    parser.add_argument("--max-ppl-ratio", type=float, default=2.0)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--sae-tokens", default="400k")
    parser.add_argument("--sae-latents", type=int, default=4096)
    parser.add_argument("--sae-k", type=int, default=32)
    parser.add_argument("--sae-candidates", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import interp
    from interp.data.concepts import load_concept, load_prompts
    from interp.dictionary import TrainConfig, load_dictionary, train
    from interp.probes import train_probes
    from interp.steering import VaderScorer, concept_latents, diff_in_means, latent_vector, probe_vector, site_mean_norm, sweep

    model = interp.load_model("smollm2-135m")
    concept = load_concept("sentiment")
    vader = VaderScorer()
    common = dict(scorer=vader, max_new_tokens=args.new_tokens, units="norm")

    dev_prompts = load_prompts("neutral_dev")
    dev_strengths = [float(v) for v in args.dev_strengths.split(",")]

    def dev_gain(name, vector, norm, folder):
        """Best VADER gain on the development prompts within the perplexity bound, and its strength."""
        table = sweep(model, {name: vector}, dev_strengths, dev_prompts, mean_norms={vector.site: norm}, out=folder, **common).table
        base = table[table["method"] == "unsteered"].iloc[0]
        ok = table[(table["method"] != "unsteered") & (table["perplexity"] <= args.max_ppl_ratio * base["perplexity"])]
        if not len(ok):
            return float("-inf"), None, base
        best = ok.loc[ok["score"].idxmax()]
        return float(best["score"] - base["score"]), float(best["strength"]), base

    # 1. development: choose the layer
    choices = []
    for layer in [int(v) for v in args.dev_layers.split(",")]:
        site = model.site("resid_post", layer)
        norm = site_mean_norm(model, site, concept.texts)
        gain, strength, base = dev_gain("diff-means", diff_in_means(model, concept, site), norm, args.out / "dev" / f"layer{layer}")
        choices.append({"layer": layer, "mean_norm": norm, "best_strength": strength, "vader_gain": gain,
                        "unsteered_vader": float(base["score"]), "unsteered_ppl": float(base["perplexity"])})
        print(f"dev layer {layer}: unsteered VADER {base['score']:.3f}, best gain {gain:+.3f}"
              f" at strength {strength} (perplexity <= {args.max_ppl_ratio}x unsteered)")
    chosen = max(choices, key=lambda c: c["vader_gain"])
    layer = chosen["layer"]
    site = model.site("resid_post", layer)
    (args.out / "dev" / "choice.json").write_text(json.dumps({"chosen_layer": layer, "layers": choices}, indent=1))
    print(f"chosen on the development prompts: layer {layer}")

    # 2. directions at that layer
    sae_dir = args.out / f"sae-L{layer}"
    sae_name = f"sae-topk-k{args.sae_k}-{args.sae_latents}"
    if not (sae_dir / "metrics.json").exists():
        train(TrainConfig(layer=layer, k=str(args.sae_k), latents=args.sae_latents, tokens=args.sae_tokens, out=sae_dir))
    sae_metrics = json.loads((sae_dir / "metrics.json").read_text())[sae_name]
    sae = load_dictionary(sae_dir / sae_name)
    ranking = concept_latents(model, sae, concept, top=args.sae_candidates)
    latent_gains = {}
    for latent in ranking["latent"].tolist():
        gain, strength, _ = dev_gain("sae-latent", latent_vector(sae, latent), chosen["mean_norm"], args.out / "dev" / f"sae-latent{latent}")
        latent_gains[latent] = gain
        print(f"dev SAE latent {latent}: best gain {gain:+.3f} at strength {strength}")
    ranking["dev_vader_gain"] = ranking["latent"].map(latent_gains)
    ranking.to_csv(args.out / "sae_latents.csv", index=False)
    latent = max(latent_gains, key=latent_gains.get)
    probes = train_probes(model, concept, [site], methods=["logistic"], progress=False)
    probe = probes.probe(site, "logistic")
    vectors = {
        "diff-means": diff_in_means(model, concept, site),
        "probe": probe_vector(probe),
        "sae-latent": latent_vector(sae, int(latent), name=str(sae_dir / sae_name)),
    }
    cosines = {a: {b: round(float(va.direction @ vb.direction), 3) for b, vb in vectors.items()} for a, va in vectors.items()}
    print(f"SAE {sae_name} at {site}: FVU {sae_metrics['fvu']:.3f}, L0 {sae_metrics['l0']:.1f}, dead {sae_metrics['dead_fraction']:.1%}, "
          f"CE recovered {sae_metrics.get('ce_recovered', float('nan')):.3f}; latent {vectors['sae-latent'].info['latent']}")
    print(f"probe held-out accuracy {probe.metrics['test_accuracy']:.3f}; cosines between directions {cosines}")

    # 3. held-out report
    test_prompts = load_prompts("neutral_test")
    norm = chosen["mean_norm"]
    result = sweep(model, vectors, [float(v) for v in args.strengths.split(",")], test_prompts, mean_norms={site: norm},
                   out=args.out / "test", **common)
    summary = {"layer": layer, "site": site, "mean_norm": norm, "sae": {"name": sae_name, **{k: sae_metrics[k] for k in
               ("fvu", "l0", "dead_fraction", "ce_recovered", "delta_lm_loss") if k in sae_metrics}},
               "sae_latent": vectors["sae-latent"].info["latent"], "probe_test_accuracy": probe.metrics["test_accuracy"],
               "cosines": cosines, "n_test_prompts": len(test_prompts)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(result.table.drop(columns=["tokens"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}/test/table.csv, sweep.html, generations.jsonl; {args.out}/summary.json")


if __name__ == "__main__":
    main()
