"""Steered generation against plain generation and TransformerLens (issue: steering).

    python experiments/bench/bench_steering.py [--batch 8] [--new-tokens 64] [--layer 6] [--repeats 9] [--threads N]

Greedy generation of ``--new-tokens`` tokens for a batch of prompts (the neutral test prompts cut
to the same token length, so no case pads), SmolLM2-135M in float32 on the CPU, KV cache on:

  interp, plain                  interp.steering.generate, no steering              <- baseline
  interp, steered (all)          + a difference-in-means vector added at blocks.L.hook_resid_post, every position
  interp, steered (generated)    + the same vector on the generated tokens only (a position mask)
  HF generate                    the HF module's own generate, no wrapper (what interp calls)
  TransformerLens, plain         HookedTransformer.generate on the same weights (built from the same HF module)
  TransformerLens, steered       + the same vector added by a TransformerLens hook at the same site

Two groups, each timed in one interleaved loop (every ratio is against a baseline of the same
loop): the interp and HF cases (``--repeats``, the 1.05x target), and interp steered against
TransformerLens (``--tl-repeats``). Times are per generation step (a batch stops early when every
row has ended); the tables give medians, and the fastest run of each case is printed too, since
on a shared machine other processes only ever add time. The script also checks that
TransformerLens's steered greedy tokens equal interp's (the hooks are equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def transformer_lens_copy(model):
    """A HookedTransformer over the same weights: TransformerLens's own config reader and weight
    conversion, fed the converted model folder and the already-loaded HF module (no download)."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    from interp.paths import interp_home

    folder = str(interp_home() / "models" / model.cfg.name)
    cfg = loading.get_pretrained_model_config(folder, fold_ln=False, device="cpu", default_prepend_bos=False)
    tl = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=True)
    state = loading.get_pretrained_state_dict(folder, cfg, hf_model=model.module)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    return tl.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=6)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--strength", type=float, default=0.5, help="multiple of the site's mean activation norm")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats of the steered-vs-plain cases")
    parser.add_argument("--tl-repeats", type=int, default=3, help="interleaved repeats of the TransformerLens cases")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "steering.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import interp
    from interp.data.concepts import load_concept, load_prompts
    from interp.steering import diff_in_means, generate, site_mean_norm, steering
    from timing import interleaved, report

    torch.manual_seed(0)
    model = interp.load_model("smollm2-135m")
    site = model.site("resid_post", args.layer)
    concept = load_concept("sentiment")
    vector = diff_in_means(model, concept, site)
    norm = site_mean_norm(model, site, concept.texts)
    added = vector.scaled(args.strength, "norm", norm)
    rows = [ids[: args.prompt_tokens] for ids in (model.tokenizer(p)["input_ids"] for p in load_prompts("neutral_test"))
            if len(ids) >= args.prompt_tokens][: args.batch]
    if len(rows) < args.batch:
        raise SystemExit(f"only {len(rows)} prompts have {args.prompt_tokens} tokens; lower --batch or --prompt-tokens")
    ids = torch.tensor(rows)
    prompts = [model.tokenizer.decode(r) for r in rows]
    assert model.tokenize(prompts).ids.equal(ids), "prompts must re-tokenize to the same ids"
    tl = transformer_lens_copy(model)
    steer_all = steering(vector, args.strength, mean_norm=norm)
    steer_generated = steering(vector, args.strength, mean_norm=norm, positions="generated")
    n = args.new_tokens
    steps: dict[str, int] = {}

    def interp_case(name, edits):
        def run():
            out = generate(model, prompts, edits, max_new_tokens=n, batch_size=args.batch)
            steps[name] = max(len(x) for x in out.new_ids)
            return out
        return run

    def hf_plain():
        with torch.no_grad():
            out = model.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                        pad_token_id=model.pad_token_id, eos_token_id=model.tokenizer.eos_token_id)
        steps["HF generate"] = out.shape[1] - ids.shape[1]
        return out

    def tl_hook(act, hook):
        return act + added.to(act)

    def tl_case(name, hooks):
        def run():
            with torch.no_grad(), tl.hooks(fwd_hooks=hooks):
                out = tl.generate(ids, max_new_tokens=n, do_sample=False, use_past_kv_cache=True, verbose=False, stop_at_eos=False)
            steps[name] = out.shape[1] - ids.shape[1]
            return out
        return run

    cases = {
        "interp, plain": interp_case("interp, plain", ()),
        "interp, steered (all positions)": interp_case("interp, steered (all positions)", steer_all),
        "interp, steered (generated positions)": interp_case("interp, steered (generated positions)", steer_generated),
        "HF generate": hf_plain,
    }
    tl_cases = {
        "interp, steered (all positions)": cases["interp, steered (all positions)"],
        "TransformerLens, plain": tl_case("TransformerLens, plain", []),
        "TransformerLens, steered (hook)": tl_case("TransformerLens, steered (hook)", [(site, tl_hook)]),
    }
    # Equivalence: TransformerLens's steered greedy tokens against interp's, position by position.
    ours = generate(model, prompts, steer_all, max_new_tokens=n, batch_size=args.batch).new_ids
    plain = generate(model, prompts, (), max_new_tokens=n, batch_size=args.batch).new_ids
    if ours == plain:
        raise SystemExit("the steered generations equal the plain ones: the timed steering does nothing")
    changed = sum(a != b for a, b in zip(ours, plain))
    print(f"steering changes the greedy continuation of {changed} of {len(ours)} prompts")
    theirs = tl_case("check", [(site, tl_hook)])()[:, ids.shape[1]:].tolist()
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in zip(ours, theirs)]
    print(f"TransformerLens vs interp steered greedy tokens: rows identical for their first {statistics.median(agree):.0f} "
          f"tokens (median over rows; min {min(agree)}, of {n})")
    shape = f"{args.batch} prompts x {args.prompt_tokens} tokens, {n} new tokens, {site}"
    results = {}
    for title, group, repeats, targets in (
        ("steered vs plain", cases, args.repeats, {"interp, steered (all positions)": 1.05, "interp, steered (generated positions)": 1.05}),
        ("TransformerLens", tl_cases, args.tl_repeats, None),
    ):
        times = interleaved(group, repeats=repeats, warmup=1)
        per_step = {name: [t / steps[name] for t in values] for name, values in times.items()}
        baseline = next(iter(group))
        results[title] = report(f"{title}: greedy generation, {shape} (seconds per generation step, median of {repeats})",
                                per_step, baseline, targets=targets)
        fastest = {name: min(values) for name, values in per_step.items()}
        print(f"{'fastest run (contention on a shared machine only adds time)':52s}")
        for name, value in fastest.items():
            print(f"  {name:50s} {value:9.4f} {value / fastest[baseline]:7.3f}  {args.batch / value:7.1f} tokens/s")
        results[title]["fastest_s"] = fastest
    median = {row["case"]: row["median_s"] for row in results["TransformerLens"]["rows"]}
    ratio = median["TransformerLens, steered (hook)"] / median["interp, steered (all positions)"]
    print(f"TransformerLens steered / interp steered (time per step, medians): {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "steps": steps, "tl_agreement_tokens": agree, "tl_ratio": ratio,
                                    "load_average_end": os.getloadavg(),
                                    "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
