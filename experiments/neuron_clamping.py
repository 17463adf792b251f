"""Neurons whose decoded token, when the neuron is clamped high, rises in probability during generation.

    python experiments/neuron_clamping.py [--out runs/neuron_clamping]

1. Decode every neuron's output column through the unembedding (final-norm gain) and keep
   candidates: layers >= 12, a top token that is a word (letters only, 3+ characters once its
   leading space is stripped), ranked by how far the top token stands out (top score minus the
   10th); the first ``--candidates``.
2. Development prompts (data/prompts.json "dev"): clamp each candidate to 5x its largest
   activation on 2,048 Shakespeare tokens at every position, greedy generation; score = p(token)
   with the clamp / without it, on the same (unclamped) contexts. The three best are kept, and
   for each the clamp scale is chosen from SCALES on the same dev prompts.
3. Test prompts (data/prompts.json "test", never used above): the three neurons at their chosen
   scales. Reported: p(token) without and with the clamp on the same contexts, along the clamped
   run's own generation, how often the token was generated, and the generations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from interp.models import load_model
from interp.neurons import clamp_effect, corpus_max_activation, decode_neurons, default_prompts, greedy_run

SCALES = [2.0, 5.0, 10.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--dev-tokens", type=int, default=12)
    parser.add_argument("--test-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("runs/neuron_clamping"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    table = decode_neurons(model, range(12, model.cfg.n_layers), weights=["down"], variant="final_gain")
    word = table.top_tokens.map(lambda t: t[0].strip().isalpha() and len(t[0].strip()) >= 3)
    gap = table.top_scores.map(lambda s: float(s[0] - s[9]))
    candidates = table[word].assign(gap=gap[word]).sort_values("gap", ascending=False).head(args.candidates)

    dev, test = default_prompts("dev"), default_prompts("test")
    dev_base = greedy_run(model, dev, args.dev_tokens)
    peaks, scored = {}, []
    for row in candidates.itertuples():
        peaks[row.layer, row.neuron] = peak = corpus_max_activation(model, row.layer, row.neuron)
        effect = clamp_effect(model, row.layer, row.neuron, 5 * peak, dev, max_new_tokens=args.dev_tokens, baseline=dev_base)
        scored.append((effect.ratio, row.layer, row.neuron, effect.token))
        print(f"dev L{row.layer} N{row.neuron} {effect.token!r}: p {effect.p_clean:.2e} -> {effect.p_clamped:.2e} ({effect.ratio:.1f}x)")
    best = sorted(scored, reverse=True)[:3]
    chosen = []
    for _, layer, neuron, token in best:
        by_scale = {s: clamp_effect(model, layer, neuron, s * peaks[layer, neuron], dev, max_new_tokens=args.dev_tokens,
                                    baseline=dev_base).ratio for s in SCALES}
        chosen.append((layer, neuron, token, max(by_scale, key=by_scale.get), by_scale))

    test_base = greedy_run(model, test, args.test_tokens)
    report = []
    for layer, neuron, token, scale, by_scale in chosen:
        effect = clamp_effect(model, layer, neuron, scale * peaks[layer, neuron], test, max_new_tokens=args.test_tokens, baseline=test_base)
        report.append({**effect.summary(), "scale": scale, "peak_activation": peaks[layer, neuron], "dev_ratio_by_scale": by_scale,
                       "generations": effect.generations.to_dict("records")})
        print(f"\nTEST L{layer} N{neuron} -> {token!r}, clamped to {scale:g} x {peaks[layer, neuron]:.2f}: p(token) "
              f"{effect.p_clean:.2e} -> {effect.p_clamped:.2e} on the same contexts ({effect.ratio:.1f}x), "
              f"{effect.p_clamped_own:.2e} along its own generation; generated {effect.count_clean} -> {effect.count_clamped} times")
        for g in effect.generations.head(2).itertuples():
            print(f"  {g.prompt!r}\n    clean:   {g.clean!r}\n    clamped: {g.clamped!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clamping.json").write_text(json.dumps({"dev_ranking": scored, "test": report}, indent=1, default=str))
    print(f"wrote {args.out}/clamping.json")


if __name__ == "__main__":
    main()
