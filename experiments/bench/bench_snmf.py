"""SNMF: one iteration against its matmul floor, and memory as the token count grows (issue: SNMF).

    python experiments/bench/bench_snmf.py [--tokens 200k] [--k 100] [--device cpu] [--repeats 3]

Speed. One iteration of a streamed fit at d_mlp 1536, k 100, 200k tokens read from an activation
store (synthetic float32 activations written once under the cache dir; the cost does not depend on
the values), with Y in memory and with Y in .npy files, against the matmul floor of an iteration
timed alone in the same run on tensors already in memory: A·Z [n, d]x[d, k], Aᵀ·Y [d, n]x[n, k]
and the Gram matrices YᵀY and ZᵀZ. An iteration's time is what the fit itself records per
iteration (``info["iteration_seconds"]``: the ridge solve, winner-take-all, one pass over the
store with the multiplicative update and the sums, the error), as the median over its iterations
and repeats. Target: at most 2x the floor.

Memory. Peak process-private memory (RssAnon from /proc, sampled every 2 ms; the store's and Y's
file maps are page cache, not counted) of a streamed fit of 3 iterations at tokens/10 and at
tokens, each in a fresh process, with Y on disk (the default of ``interp snmf``) and with Y in
memory (k x tokens floats, which must grow). On CUDA, the peak of allocated device memory too.
Target: with Y on disk, the same at both sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

D, SITE = 1536, "blocks.0.mlp.hook_post"
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def synthetic_store(tokens: int) -> Path:
    """A float32 store of random [tokens, 1536] activations under the cache dir (written once)."""
    from interp.paths import interp_home
    from interp.store import ActivationStore, write_arrays

    path = interp_home() / "bench" / f"snmf-synthetic-{tokens}x{D}"
    if (path / "manifest.json").exists() and ActivationStore(path).complete:
        return path
    if path.exists():
        import shutil

        shutil.rmtree(path)
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(tokens, D, generator=g)
    write_arrays(path, {SITE: acts}, source="snmf-bench")
    return path


def matmul_floor(tokens: int, k: int, device: str):
    """The products of one iteration alone, on in-memory tensors."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(tokens, D, generator=g).to(device)
    Y = torch.rand(tokens, k, generator=g).to(device)
    Z = torch.randn(D, k, generator=g).to(device)

    def run() -> None:
        P = A @ Z
        AtY = A.T @ Y
        YtY = Y.T @ Y
        ZtZ = Z.T @ Z
        if device != "cpu":
            torch.cuda.synchronize()
        del P, AtY, YtY, ZtZ

    return run


def iteration_seconds(store_path: Path, k: int, device: str, iterations: int, on_disk: bool) -> list[float]:
    from interp.snmf import SNMFConfig, StoreActivations, fit
    from interp.store import ActivationStore

    source = StoreActivations(ActivationStore(store_path), SITE, cache=None)
    config = SNMFConfig(k=k, max_iter=iterations, patience=10**6, device=device)
    with tempfile.TemporaryDirectory(dir=store_path.parent) as work:
        result = fit(source, config, workdir=work if on_disk else None, progress=False, n_top=8)
    return result.info["iteration_seconds"]


def child_memory(store_path: str, k: int, device: str, on_disk: bool) -> None:
    """Run in a fresh process: a 3-iteration fit, printing the peak RssAnon (MB) as JSON."""
    from interp.snmf import SNMFConfig, StoreActivations, fit
    from interp.store import ActivationStore

    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.002)

    source = StoreActivations(ActivationStore(store_path), SITE, cache=False)
    config = SNMFConfig(k=k, max_iter=3, patience=10**6, device=device)
    base = _rss_anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory(dir=Path(store_path).parent) as work:
        fit(source, config, workdir=work if on_disk else None, progress=False, n_top=8)
    stop.set()
    thread.join()
    out = {"peak_anon_mb": peak[0] / 1024, "start_anon_mb": base / 1024}
    if device != "cpu":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def main() -> None:
    from interp.config import parse_count

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="200k")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3, help="iterations per timed fit")
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--on-disk", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.k, args.device, bool(args.on_disk))
        return
    tokens = parse_count(args.tokens)
    big, small = synthetic_store(tokens), synthetic_store(tokens // 10)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, d_mlp {D}, k {args.k}, tokens {tokens:,}")

    floor = interleaved({"floor": matmul_floor(tokens, args.k, args.device)}, repeats=args.repeats)["floor"]
    runs = {"Y in memory": [], "Y on disk": []}
    for _ in range(args.repeats):  # alternate the two variants so drift hits both alike
        runs["Y in memory"] += iteration_seconds(big, args.k, args.device, args.iterations, on_disk=False)
        runs["Y on disk"] += iteration_seconds(big, args.k, args.device, args.iterations, on_disk=True)
    floor_s = statistics.median(floor)
    print(f"\n{'case':40s} {'median s':>9s} {'/ floor':>8s} {'target':>7s}")
    print(f"{'matmul floor (A·Z, Aᵀ·Y, YᵀY, ZᵀZ)':40s} {floor_s:9.3f} {1:8.2f}")
    speed = {"floor_s": floor_s, "floor_all_s": floor}
    for name, values in runs.items():
        median = statistics.median(values)
        verdict = "ok" if median / floor_s <= 2 else "MISSED"
        print(f"{'one iteration, ' + name:40s} {median:9.3f} {median / floor_s:8.2f} {'<=2.00':>7s} {verdict}")
        speed[name] = {"median_s": median, "ratio": median / floor_s, "all_s": values}

    memory = {}
    print("\npeak private memory (RssAnon) of a 3-iteration fit, fresh process each")
    for on_disk in (True, False):
        for path, n in ((small, tokens // 10), (big, tokens)):
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, __file__, "--child-memory", str(path), "--k", str(args.k),
                                  "--device", args.device, "--on-disk", str(int(on_disk))],
                                 capture_output=True, text=True, env=env, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            memory[f"{'disk' if on_disk else 'memory'}-{n}"] = row
            extra = f", CUDA {row['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in row else ""
            print(f"  Y {'on disk  ' if on_disk else 'in memory'} {n:>9,} tokens: {row['peak_anon_mb']:7.0f} MB "
                  f"(at start {row['start_anon_mb']:.0f} MB){extra}")
        a, b = memory[f"{'disk' if on_disk else 'memory'}-{tokens // 10}"], memory[f"{'disk' if on_disk else 'memory'}-{tokens}"]
        print(f"  Y {'on disk  ' if on_disk else 'in memory'} 10x tokens -> {b['peak_anon_mb'] / a['peak_anon_mb']:.2f}x memory")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "snmf.json"
    out.write_text(json.dumps({"device": args.device, "tokens": tokens, "k": args.k, "speed": speed, "memory": memory}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
