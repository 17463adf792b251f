"""Triton kernel benchmark on a CUDA GPU (issue: fused kernels).

    python experiments/bench/bench_kernels_gpu.py [--tokens 16384] [--d 768] [--latents 16384] [--k 32]

Needs a CUDA device (the CPU machines here have none; the CPU fast path is measured by
bench_sae_step.py). Prints, measured in one run with CUDA events (median of 20 after warm-up):
  fused encoder + TopK (Triton)   vs  the bare matmul x @ W_enc^T of the same shape (goal: <= 1.1x)
                                  and the dense path (matmul, ReLU, torch.topk)
  sparse decoder (Triton)         vs  dense decode (scatter codes to [tokens, latents], then @ W_dec)
                                  at latents / k >= 512 (goal: >= 10x faster)
and checks the fused kernel's top-k values against the dense path. Everything is IEEE float32 (no
TF32 on either side). `experiments/bench/gpu_check.sh` runs this together with the kernel tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def cuda_time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures the Triton kernels on a GPU (see bench_sae_step.py for the CPU path)")
    from interp_kernels import reference
    from interp_kernels.triton_kernels import decode_triton, topk_encode_triton

    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32 on both sides, as the Triton kernel computes
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.tokens, args.d, device="cuda", generator=g)
    W = torch.randn(args.latents, args.d, device="cuda", generator=g) / args.d**0.5
    b = torch.zeros(args.latents, device="cuda")
    W_dec = torch.randn(args.latents, args.d, device="cuda", generator=g) / args.d**0.5

    matmul = cuda_time(lambda: x @ W.T)
    fused = cuda_time(lambda: topk_encode_triton(x, W, b, args.k))
    dense = cuda_time(lambda: reference.topk_encode(x, W, b, args.k))
    values, indices = topk_encode_triton(x, W, b, args.k)
    ref_values, _ = reference.topk_encode(x, W, b, args.k)
    value_error = float((values.sort(-1).values - ref_values.sort(-1).values).abs().max())

    def dense_decode() -> torch.Tensor:
        codes = torch.zeros(args.tokens, args.latents, device="cuda").scatter_(1, indices, values)
        return codes @ W_dec

    sparse_t = cuda_time(lambda: decode_triton(values, indices, W_dec))
    dense_t = cuda_time(dense_decode)
    print(f"{torch.cuda.get_device_name()}: tokens {args.tokens}, d {args.d}, latents {args.latents}, k {args.k}")
    print(f"bare matmul              {matmul * 1e3:8.3f} ms")
    print(f"fused encoder + TopK     {fused * 1e3:8.3f} ms  = {fused / matmul:.2f}x the matmul (goal <= 1.1x)")
    print(f"dense matmul+relu+topk   {dense * 1e3:8.3f} ms")
    print(f"top-k values vs dense    max |diff| {value_error:.2e}")
    print(f"sparse decoder (Triton)  {sparse_t * 1e3:8.3f} ms")
    print(f"dense decoder            {dense_t * 1e3:8.3f} ms  -> sparse is {dense_t / sparse_t:.1f}x faster "
          f"(k / latents = 1/{args.latents // args.k}; goal >= 10x at <= 1/512)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "matmul_s": matmul, "fused_s": fused,
                                    "dense_topk_s": dense, "sparse_decode_s": sparse_t, "dense_decode_s": dense_t,
                                    "value_error": value_error, **vars(args)}, default=str, indent=1))


if __name__ == "__main__":
    main()
