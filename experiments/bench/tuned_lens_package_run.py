"""Train a lens with the `tuned-lens` package (0.2.0) on given token contexts; run by bench_tuned_lens.py.

This script runs in the package's own environment (it cannot live in interp's: see
bench_tuned_lens.py), imports nothing from interp, and uses the package's training loop
(`tuned_lens.scripts.train_loop.Train.execute`) unchanged. Only the data source is replaced:
instead of tokenizing a text dataset, the loop reads the exact token contexts interp's store was
harvested from. It writes the trained translators as safetensors and the timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


class FixedContexts:
    """Stands in for `ingredients.Data`: the same contexts interp trains on (BOS + 127 tokens each)."""

    def __init__(self, contexts: np.ndarray):
        self.contexts = contexts

    def load(self, tokenizer):  # noqa: ARG002 - the package's signature
        from datasets import Dataset

        data = Dataset.from_dict({"input_ids": self.contexts.tolist()}).with_format("torch")
        return data, 1.0  # nats-to-bits-per-byte is only used for logging


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="HF folder of the model")
    parser.add_argument("--tokenizer", required=True, help="folder with a tokenizer this transformers version loads")
    parser.add_argument("--contexts", required=True, help=".npy int array [n, context_len]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--tokens-per-step", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8, help="contexts per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tuned_lens.scripts.ingredients as ing
    from safetensors.torch import save_file
    from tuned_lens.scripts.train_loop import Train

    torch.manual_seed(args.seed)
    out = Path(args.out)
    contexts = np.load(args.contexts)
    train = Train(
        model=ing.Model(name=args.model, tokenizer=args.tokenizer, precision="float32"),
        data=FixedContexts(contexts),  # type: ignore[arg-type]
        opt=ing.Optimizer(),  # the package's defaults: SGD, Nesterov momentum 0.9, lr 1.0, weight decay 1e-3
        dist=ing.Distributed(per_gpu_batch_size=args.batch),
        output=out / "lens",
        seed=args.seed,
        num_steps=args.steps,
        tokens_per_step=args.tokens_per_step,
    )
    timings = {}
    setup = train.setup

    def timed_setup():
        started, cpu = time.perf_counter(), time.process_time()
        result = setup()
        timings["setup_seconds"], timings["setup_cpu_seconds"] = time.perf_counter() - started, time.process_time() - cpu
        return result

    train.setup = timed_setup  # type: ignore[method-assign]
    started, cpu = time.perf_counter(), time.process_time()
    train.execute()
    timings["total_seconds"], timings["total_cpu_seconds"] = time.perf_counter() - started, time.process_time() - cpu
    timings["train_seconds"] = timings["total_seconds"] - timings["setup_seconds"]
    timings["train_cpu_seconds"] = timings["total_cpu_seconds"] - timings["setup_cpu_seconds"]  # all threads, robust to other load
    timings["threads"] = torch.get_num_threads()

    state = torch.load(out / "lens" / "params.pt", map_location="cpu", weights_only=True)
    n = len({k.split(".")[0] for k in state})  # the translators' state dict: "0.weight", "0.bias", ...
    weight = torch.stack([state[f"{i}.weight"] for i in range(n)]).float().contiguous()
    bias = torch.stack([state[f"{i}.bias"] for i in range(n)]).float().contiguous()
    save_file({"weight": weight, "bias": bias}, out / "translators.safetensors")
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
