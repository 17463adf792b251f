"""Decoding every MLP neuron of SmolLM2 (30 layers x 1,536 neurons x gate, up and down) through the unembedding.

    python experiments/bench/bench_neuron_decoding.py [--out runs/bench/neuron_decoding.json]

Times interp's `decode_neurons` (top and bottom 10 tokens of every vector; bfloat16 screen with
exact float32 rescoring where the CPU multiplies bfloat16 natively) over all 30 layers, and, in
the same run, the plain float32 computation (one float32 matmul per chunk + torch.topk both ways)
on three layers, scaled to 30. Checks that both give the same tokens on those layers. Peak memory
is the decoding process's peak resident set (model included) after the model was loaded, read
from /proc (VmHWM, reset with clear_refs before decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from interp.models import load_model
from interp.neurons import decode_neurons

SAMPLE_LAYERS = [0, 15, 29]


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="final_gain")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/neuron_decoding.json"))
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    decode_neurons(model, [0], weights=["up"], variant=args.variant, progress=False)  # warm-up (allocations, kernels)
    loaded = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    result = {"threads": torch.get_num_threads(), "load_average_start": os.getloadavg(), "rss_after_load_mb": loaded}

    started, cpu = time.perf_counter(), time.process_time()
    table = decode_neurons(model, variant=args.variant, progress=False)
    result["interp_seconds"], result["interp_cpu_seconds"] = time.perf_counter() - started, time.process_time() - cpu
    result["peak_rss_mb"] = rss_mb("VmHWM")
    result["vectors"] = len(table)

    started = time.perf_counter()
    plain = decode_neurons(model, SAMPLE_LAYERS, variant=args.variant, compute_dtype="float32", progress=False)
    result["float32_sample_seconds"] = time.perf_counter() - started
    result["float32_estimate_seconds"] = result["float32_sample_seconds"] * model.cfg.n_layers / len(SAMPLE_LAYERS)
    result["load_average_end"] = os.getloadavg()
    ours = table[table.layer.isin(SAMPLE_LAYERS)].reset_index(drop=True)
    same = [np.array_equal(a, b) for a, b in zip(ours.top_ids, plain.top_ids, strict=True)]
    same += [np.array_equal(a, b) for a, b in zip(ours.bottom_ids, plain.bottom_ids, strict=True)]
    result["same_tokens_fraction"] = float(np.mean(same))
    result["speedup"] = result["float32_estimate_seconds"] / result["interp_seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['vectors']:,} vectors (30 layers x 1,536 neurons x gate/up/down), top and bottom 10 tokens, {result['threads']} threads")
    print(f"interp: {result['interp_seconds']:.1f} s (CPU {result['interp_cpu_seconds']:.0f} s); peak RSS {result['peak_rss_mb']:.0f} MB "
          f"({result['peak_rss_mb'] - loaded:.0f} MB above the loaded model)")
    print(f"plain float32 (measured on layers {SAMPLE_LAYERS}, scaled to 30): {result['float32_estimate_seconds']:.1f} s "
          f"-> interp {result['speedup']:.2f}x; same top/bottom tokens on those layers: {100 * result['same_tokens_fraction']:.2f}%")
    print(f"load average {result['load_average_start']} -> {result['load_average_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
