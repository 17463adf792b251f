"""Patching benchmark (issue: patching suite).

    python experiments/bench/bench_patching.py [--prompts 8] [--skip-embedded] [--estimators-only]

Part 1, a TransformerLens model (random weights, 6 layers, d_model 256, 8 heads; byte tokens,
8 prompt pairs of 24 tokens): the full activation-patching sweep (resid_pre, attn_out, mlp_out by
layer x position) with transformer_lens.patching (one forward per cell) against interp's batched
sweep, same metric; prints both times, the speed-up and the largest difference of any cell. Run
twice: with a 320-symbol vocabulary (the unembedding is nearly free, the hardest case for interp)
and with GPT-2's 50,257 (as in pretrained TransformerLens models, where every full forward pays
for logits at every position). interp is timed after a warm-up (median of 3, timing.interleaved), TransformerLens once.

Part 2, the embedded model (SmolLM2, IOI task): attribution patching, AtP* (QK fix), RelP (its
default rules) and the full activation-patching sweep over the same cells; prints the cost ratios
(targets: AtP* and RelP each <= 1.3x attribution patching, timed interleaved in the same run).
``--estimators-only`` times the three estimators alone (no TransformerLens part, no sweep).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from interp.models.tiny import TINY_VOCAB
from timing import interleaved  # experiments/bench/timing.py, beside this script

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"
GPT2_VOCAB = 50257


def transformer_lens_part(prompts: int, d_vocab: int) -> dict:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import patching as tlp

    from interp.models import wrap_module
    from interp.models.tiny import byte_tokenizer
    from interp.patching import activation_patching, pairs_task

    cfg = HookedTransformerConfig(n_layers=6, d_model=256, n_ctx=64, d_head=32, n_heads=8, d_mlp=1024, d_vocab=d_vocab,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = wrap_module(HookedTransformer(cfg), byte_tokenizer(), name="tl-6x256")
    words = ["north", "south", "river", "stone", "light", "quiet", "ember", "cloud"]
    clean = [f"{words[i % 8]} and {words[(i + 3) % 8]} went to the sea." [:24].ljust(24, ".") for i in range(prompts)]
    corrupt = [text[:6] + ("X" if text[6] != "X" else "Y") + text[7:] for text in clean]
    task = pairs_task(model, clean, corrupt, ["a"] * prompts, ["b"] * prompts)
    kinds = ("resid_pre", "attn_out", "mlp_out")
    ids = torch.arange(len(task))

    def metric(logits):
        return task.metric(logits[:, -1], ids).mean()

    start = time.perf_counter()
    _, clean_cache = model.module.run_with_cache(task.clean.ids)
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # quiet its progress bars
        expected = {
            "resid_pre": tlp.get_act_patch_resid_pre(model.module, task.corrupt.ids, clean_cache, metric),
            "attn_out": tlp.get_act_patch_attn_out(model.module, task.corrupt.ids, clean_cache, metric),
            "mlp_out": tlp.get_act_patch_mlp_out(model.module, task.corrupt.ids, clean_cache, metric),
        }
    tl_seconds = time.perf_counter() - start
    runs = []
    seconds = statistics.median(interleaved({"interp": lambda: runs.append(activation_patching(model, task, kinds, progress=False))},
                                            repeats=3)["interp"])
    ours = runs[-1]
    diff = max(float((torch.from_numpy(ours.grid(k, "metric")).float() - expected[k].float()).abs().max()) for k in kinds)
    cells = len(ours.table)
    print(f"\nTransformerLens model (6 layers, d_model 256, vocabulary {d_vocab}), {prompts} prompts x {task.clean.ids.shape[1]} tokens, {cells} cells")
    print(f"transformer_lens.patching sweep {tl_seconds:8.2f} s")
    print(f"interp batched sweep            {seconds:8.2f} s   speed-up {tl_seconds / seconds:.1f}x (target >= 10x)")
    print(f"largest difference of any cell  {diff:.2e} (target <= 1e-5)")
    return {"d_vocab": d_vocab, "cells": cells, "transformer_lens_s": tl_seconds, "interp_s": seconds, "speedup": tl_seconds / seconds, "max_abs_diff": diff}


def embedded_part(prompts: int, sweep: bool = True) -> dict:
    import interp
    from interp.patching import Rules, activation_patching, atp_star, attribution_patching, ioi_task

    model = interp.load_model("smollm2-135m")
    task = ioi_task(model, prompts)
    print(f"\n{task.summary()}")
    rules = Rules()
    times = interleaved({"attribution patching": lambda: attribution_patching(model, task),
                         "AtP* (QK fix)": lambda: atp_star(model, task),
                         f"RelP ({rules})": lambda: attribution_patching(model, task, rules=rules)}, repeats=5)
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["attribution patching"]
    relp, star = median[f"RelP ({rules})"], median["AtP* (QK fix)"]
    for name, seconds in median.items():
        print(f"{name:32s} {seconds:8.2f} s")
    print(f"AtP* / attribution patching   = {star / base:.2f} (target <= 1.3)")
    print(f"RelP / attribution patching   = {relp / base:.2f} (target <= 1.3)")
    out = {"task": task.summary(), "attribution_s": base, "atp_star_s": star, "relp_s": relp,
           "atp_star_over_attribution": star / base, "relp_over_attribution": relp / base}
    if sweep:
        result = activation_patching(model, task, progress=False)
        print(f"cells per method: {len(result.table)}")
        print(f"{'activation patching sweep':32s} {result.seconds:8.2f} s")
        print(f"activation sweep / RelP       = {result.seconds / relp:.0f}x (target >= 20x)")
        out.update(sweep_s=result.seconds, sweep_over_relp=result.seconds / relp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--estimators-only", action="store_true", help="only attribution patching, AtP* and RelP on the embedded model")
    parser.add_argument("--out", type=Path, default=RESULTS / "patching.json")
    args = parser.parse_args()
    results = {}
    if not args.estimators_only:
        results["transformer_lens"] = [transformer_lens_part(args.prompts, vocab) for vocab in (TINY_VOCAB, GPT2_VOCAB)]
    if not args.skip_embedded:
        results["embedded"] = embedded_part(args.prompts, sweep=not args.estimators_only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
