"""Cache overhead against a plain HF forward on the embedded model (issue: foundation).

    python experiments/bench/bench_cache_overhead.py [--batch 8] [--seq 128] [--repeats 7]

Cases, all on the same 8 x 128 Shakespeare tokens, float32, CPU, full forward (logits computed):
  plain HF forward                 model.module(input_ids)      <- baseline
  interp, no hooks registered      model(tokens)
  interp, one residual site        run_with_cache(..., "blocks.15.hook_resid_post", stop_at_layer=None)
  interp, all sites (no patterns)  every site but attn.hook_pattern, all 30 layers
  interp, all sites                every site, attention patterns included
  nnsight, one residual site       the same capture through nnsight's tracing (the anchor)
  nnsight, all sites (no patterns) the same modules' inputs/outputs through nnsight
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_overhead.json")
    args = parser.parse_args()

    import interp
    from interp.data import load_corpus, token_contexts
    from timing import interleaved, report

    model = interp.load_model("smollm2-135m")
    contexts = token_contexts(load_corpus("shakespeare"), model.tokenizer, context_len=args.seq, n_contexts=args.batch)
    ids = torch.from_numpy(contexts.tokens).long()
    all_sites = model.site_names()
    no_patterns = [n for n in all_sites if not n.endswith("hook_pattern")]
    one = "blocks.15.hook_resid_post"
    lm = model.nnsight
    layers = lm.model.layers

    # nnsight keeps what is assigned; the saved tensors are returned, as interp's cache is.
    def nnsight_one() -> list:
        saved = []
        with lm.trace(ids):
            saved.append(layers[15].output.save())
        return saved

    def nnsight_all() -> list:
        # Same tensors as interp's sites minus patterns, requested in execution order.
        saved = []
        with lm.trace(ids):
            saved.append(lm.model.embed_tokens.output.save())
            for layer in layers:
                saved.append(layer.input.save())
                saved.append(layer.input_layernorm.output.save())
                saved.append(layer.self_attn.o_proj.input.save())
                saved.append(layer.self_attn.output[0].save())
                saved.append(layer.post_attention_layernorm.input.save())
                saved.append(layer.post_attention_layernorm.output.save())
                saved.append(layer.mlp.down_proj.input.save())
                saved.append(layer.mlp.output.save())
                saved.append(layer.output.save())
            saved.append(lm.model.norm.output.save())
        assert len(saved) == 2 + 9 * len(layers)
        return saved

    cases = {
        "plain HF forward": lambda: model.module(input_ids=ids, use_cache=False),
        "interp, no hooks registered": lambda: model(ids),
        "interp, one residual site": lambda: model.run_with_cache(ids, one, stop_at_layer=None),
        "interp, all sites (no patterns)": lambda: model.run_with_cache(ids, no_patterns, stop_at_layer=None),
        "interp, all sites (patterns too)": lambda: model.run_with_cache(ids, all_sites, stop_at_layer=None),
        "nnsight, one residual site": nnsight_one,
        "nnsight, all sites (no patterns)": nnsight_all,
    }
    with torch.no_grad():
        times = interleaved(cases, repeats=args.repeats)
    report(
        f"Cache overhead, {model.cfg.name}, batch {args.batch} x {args.seq} tokens, float32, "
        f"{torch.get_num_threads()} threads",
        times,
        "plain HF forward",
        targets={"interp, no hooks registered": 1.03, "interp, one residual site": 1.10,
                 "interp, all sites (no patterns)": 1.5, "interp, all sites (patterns too)": 1.5},
        out=args.out,
        extra={"sites_all": len(all_sites), "sites_no_patterns": len(no_patterns)},
    )


if __name__ == "__main__":
    main()
