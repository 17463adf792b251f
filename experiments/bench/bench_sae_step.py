"""SAE training-step throughput and encoder memory (issues: SAE trainer, kernels).

    pip install -e ".[bench]"     # EleutherAI sparsify, the anchor beside SAELens
    python experiments/bench/bench_sae_step.py [--dtypes float32,bfloat16] [--repeats 5]

One step = forward, backward and optimizer update of a TopK SAE at d = 768, 16384 latents,
k = 32, 4096 tokens, on identical inputs for every implementation:
  bare matmul       x @ W_enc^T alone: the floor a step cannot go below (the encoder-matmul limit)
  interp            SparseDictionary + step_dictionary (fused chunked encoder+TopK, sparse
                    backward, embedding_bag decoder, fused Adam, decoder renormalisation)
  sparsify          EleutherAI sparsify's SparseCoder forward (with AuxK mask), backward, gradient
                    projection, Adam, decoder renormalisation
  SAELens           SAELens's TopKTrainingSAE.training_forward_pass, backward, grad clipping, Adam
In bfloat16, each implementation runs its bfloat16 path on bfloat16 inputs (a bfloat16 store):
interp as its trainer does with `--compute-dtype auto`: bfloat16 encoder matmuls with float32
master weights where the CPU has native bfloat16 (AVX-512 BF16 / AMX), otherwise the inputs are
widened to float32 (inside the timed step) because emulated bfloat16 matmuls are several times
slower than float32 ones; the row "interp, bfloat16 matmuls forced" shows that slower choice.
sparsify and SAELens run with bfloat16 parameters. The script prints whether bfloat16 is native.
A step that takes over a minute is timed once (its warm-up step), so the anchors stay affordable.

Memory: peak resident memory of one encoder+TopK forward and backward, interp's chunked path
against the dense reference (x @ W_enc^T -> ReLU -> topk), each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
# sparsify picks a Triton decoder whenever triton is installed, CUDA or not; on a CPU use its eager one.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if torch.cuda.is_available() else "1")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"
D, LATENTS, K, TOKENS = 768, 16384, 32, 4096


def inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4 * D, D, generator=g) / D**0.5
    codes = torch.relu(torch.randn(TOKENS, 4 * D, generator=g) - 2.0)  # sparse-ish non-negative mixtures
    return (codes @ basis).to(dtype)


def interp_step(dtype: torch.dtype, compute: str = "auto"):
    from interp.dictionary import DictionaryConfig, SparseDictionary
    from interp.dictionary.train import compute_dtype, step_dictionary

    x = inputs(dtype)
    d = SparseDictionary(DictionaryConfig(d_in=D, n_latents=LATENTS, k=K), seed=0)
    d.compute_dtype = compute_dtype(compute) if dtype == torch.bfloat16 else None
    opt = torch.optim.Adam(d.parameters(), lr=1e-4, fused=True)
    since = torch.zeros(LATENTS, dtype=torch.long)

    def step() -> None:
        batch = x if d.compute_dtype is not None else x.float()  # as the trainer reads a bfloat16 store
        step_dictionary(d, opt, batch, batch, since, lr=1e-4, auxk_dead=10**12, auxk_coefficient=1 / 32)

    return step


def interp_forced_bfloat16_step(dtype: torch.dtype):
    return interp_step(dtype, compute="bfloat16")


def sparsify_step(dtype: torch.dtype):
    from sparsify import SparseCoder, SparseCoderConfig

    x = inputs(dtype)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=LATENTS, k=K), dtype=dtype)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(LATENTS, dtype=torch.bool)

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def saelens_step(dtype: torch.dtype):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    x = inputs(dtype)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=LATENTS, k=K, dtype=name, device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(LATENTS, dtype=torch.bool)

    def step() -> None:
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def bare_matmul(dtype: torch.dtype):
    x = inputs(dtype)
    W = (torch.randn(LATENTS, D) / D**0.5).to(dtype)
    return lambda: x @ W.T


def time_case(make, dtype: torch.dtype, repeats: int) -> list[float]:
    step = make(dtype)
    start = time.perf_counter()
    step()  # warm-up (allocations, first-call paths)
    if time.perf_counter() - start > 60:  # first-call costs are noise beside a step this long
        return [time.perf_counter() - start]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def peak_memory(kind: str) -> float:
    """Peak resident MB added by one encoder+TopK forward/backward, measured in a fresh process.

    The kernel's high-water mark (VmHWM) is reset after the inputs exist (Linux: clear_refs 5),
    so the figure is the step's own peak above the inputs.
    """
    code = f"""
import torch
import interp_kernels as K
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
x = torch.randn({TOKENS}, {D}); W = (torch.randn({LATENTS}, {D}) / {D}**0.5).requires_grad_(); b = torch.zeros({LATENTS}, requires_grad=True)
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
values, _ = K.topk_encode(x, W, b, {K}, backend={kind!r})
values.sum().backward()
print((status("VmHWM:") - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    global D, LATENTS, K, TOKENS
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "sae_step.json")
    parser.add_argument("--shape", default=f"{D},{LATENTS},{K},{TOKENS}", help="d,latents,k,tokens (smaller for a quick check)")
    args = parser.parse_args()
    D, LATENTS, K, TOKENS = (int(v) for v in args.shape.split(","))
    import interp_kernels as Kern

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bfloat16 matmul: {Kern.native_bfloat16()}, "
          f"{torch.get_num_threads()} threads")
    cases = {"bare matmul x @ W_enc^T": bare_matmul, "interp": interp_step}
    try:
        import sparsify  # noqa: F401

        cases["sparsify"] = sparsify_step
    except ImportError:
        print("sparsify is not installed (pip install -e '.[bench]'); skipping it")
    cases["SAELens"] = saelens_step
    results: dict = {"shape": {"d": D, "latents": LATENTS, "k": K, "tokens": TOKENS}, "native_bfloat16": Kern.native_bfloat16()}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        dtype_cases = dict(cases)
        if dtype == torch.bfloat16 and not Kern.native_bfloat16():
            dtype_cases = {"bare matmul x @ W_enc^T": bare_matmul, "bare matmul in float32": lambda _: bare_matmul(torch.float32),
                           "interp": interp_step, "interp, bfloat16 matmuls forced": interp_forced_bfloat16_step,
                           **{c: m for c, m in cases.items() if c not in ("bare matmul x @ W_enc^T", "interp")}}
        timed = {case: time_case(make, dtype, args.repeats if case != "SAELens" else max(2, args.repeats // 2))
                 for case, make in dtype_cases.items()}
        median = {case: sorted(v)[len(v) // 2] for case, v in timed.items()}
        print(f"\n{name}: one step = {TOKENS} tokens")
        print(f"{'case':34s} {'s/step':>8s} {'tok/s':>8s} {'interp speed-up':>16s}")
        for case, seconds in median.items():
            print(f"{case:34s} {seconds:8.3f} {TOKENS / seconds:8.0f} {seconds / median['interp']:15.2f}x")
        # The limit is the bare matmul in the dtype interp's encoder actually runs in.
        matmul = median.get("bare matmul in float32", median["bare matmul x @ W_enc^T"])
        limit = matmul / median["interp"]
        print(f"interp reaches {limit:.0%} of the encoder-matmul limit (bare matmul time / step time)")
        table = {"title": f"{name}: one step, d {D}, {LATENTS} latents, k {K}, {TOKENS} tokens", "baseline": "interp",
                 "rows": [{"case": case, "median_s": s, "ratio": s / median["interp"]} for case, s in median.items()]}
        results[name] = {"seconds": timed, "median": median, "fraction_of_matmul_limit": limit, "table": table}
    mem = {kind: peak_memory(kind) for kind in ("cpu", "reference")}
    print(f"\nencoder+TopK peak memory: interp chunked {mem['cpu']:.0f} MB, dense reference {mem['reference']:.0f} MB "
          f"({mem['reference'] / mem['cpu']:.1f}x lower; dense pre-activations alone are {TOKENS * LATENTS * 4 / 2**20:.0f} MB)")
    results["peak_memory_mb"] = mem
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
