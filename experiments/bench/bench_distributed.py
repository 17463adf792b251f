"""Scale-out throughput: 1-rank vs 2-rank harvest and SAE training under torchrun (issue: scale-out).

    python experiments/bench/bench_distributed.py [--tokens 40k] [--steps 12]

Every configuration runs as its own ``torchrun --standalone`` job (gloo) on the same inputs and
times only the work itself (between barriers, after the model or store is loaded):
  harvest   SmolLM2-135M to ``--site`` over ``--tokens`` Shakespeare tokens; 1 rank with all the
            machine's threads (the baseline), then N ranks with threads / N each; the two stores
            are checked to hold the same bytes (the manifests' sha256 of every shard file).
  train     a TopK SAE (d 576, ``--latents``, k 32, global batch ``--batch`` tokens) on the
            harvested store for ``--steps`` steps after one untimed warm-up step: 1 rank vs N ranks data-parallel; then a sweep of
            N dictionaries (k 16, 32, ...) in one process vs dictionary-parallel on N ranks.
  all-reduce  the gradient all-reduce of one data-parallel step alone (``P`` float32 values,
            P = parameters of the SAE), timed under the same N-rank job.
Communication per data-parallel step: one ring all-reduce of 4P bytes, i.e. 2 (N-1)/N x 4P bytes
sent and received by each rank (plus a few kB of statistics); a harvest exchanges only shard
records (hundreds of bytes per shard). Results: printed, and runs/bench/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"
D_MODEL = 576


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration (run by torchrun); rank 0 writes {"seconds": ...} to args.result."""
    from interp import distributed

    ranks = distributed.ranks("cpu")
    torch.set_num_threads(args.threads)
    if args.job == "harvest":
        from interp.models import load_model
        from interp.store import HarvestConfig, harvest

        model = load_model("smollm2-135m")
        config = HarvestConfig(out=Path(args.out), model="smollm2-135m", sites=args.site, tokens=args.tokens, batch_size=16,
                               shard_contexts=64)
        ranks.barrier()
        start = time.perf_counter()
        harvest(config, model=model, progress=False)
        seconds = time.perf_counter() - start
        extra = {}
    elif args.job == "train":
        from interp.dictionary import TrainConfig
        from interp.dictionary.train import Trainer

        config = TrainConfig(model="none", store=args.store, site=args.site, k=args.k, latents=args.latents,
                             tokens=(args.steps + 1) * args.batch, batch_size=args.batch, eval_tokens=1024, eval_contexts=0,
                             checkpoint_every=10**9, out=Path(args.out), parallel=args.parallel, compute_dtype="float32",
                             lr=1e-4, warmup_steps=1)
        trainer = Trainer(config, progress=False)
        batches = trainer._batches()
        trainer.train_step(next(batches)[1])  # warm-up (allocations, kernel choice), not timed
        ranks.barrier()
        start = time.perf_counter()
        while trainer.step < trainer.steps:  # the training loop alone (Trainer.run adds evaluation and files)
            _, batch = next(batches)
            trainer.train_step(batch)
        ranks.barrier()
        seconds = time.perf_counter() - start
        first = next(iter(trainer.dictionaries.values()))
        with torch.no_grad():  # how many latent rows one batch's gradient touches (why the all-reduce is dense)
            touched = first.encode_scaled(first.encoder_input(next(batches)[1][trainer.in_site])).indices.unique().numel()
        extra = {"parameters": sum(p.numel() for d in trainer.dictionaries.values() for p in d.parameters()),
                 "latent_rows_touched": touched / args.latents}
    else:  # allreduce: P float32 values, as sum_gradients sends them
        flat = torch.randn(args.values)
        ranks.all_reduce(flat)
        ranks.barrier()
        start = time.perf_counter()
        for _ in range(5):
            ranks.all_reduce(flat)
        seconds = (time.perf_counter() - start) / 5
        extra = {}
    if ranks.is_main:
        Path(args.result).write_text(json.dumps({"seconds": seconds, **extra}))
    ranks.barrier()
    distributed.close_process_group()


def launch(nproc: int, threads: int, job_args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
               "--worker", "--threads", str(threads), "--result", result, *job_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


def same_store(a: Path, b: Path) -> bool:
    """The same shards, files and sha256 checksums in both manifests."""
    shards = [json.loads((p / "manifest.json").read_text())["shards"] for p in (a, b)]
    return shards[0] == shards[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="data", help=argparse.SUPPRESS)
    parser.add_argument("--k", default="32", help=argparse.SUPPRESS)
    parser.add_argument("--values", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the 1-rank baseline (all cores)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--site", default="blocks.6.hook_resid_post")
    parser.add_argument("--tokens", default="40k")
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if args.worker:
        from interp.config import parse_count

        args.tokens = parse_count(args.tokens)
        worker(args)
        return

    n, threads = args.ranks, args.threads
    per_rank = max(1, threads // n)
    scratch = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    report: dict = {"ranks": n, "threads": threads, "threads_per_rank": per_rank, "cpu_count": os.cpu_count()}
    try:
        from interp.config import parse_count

        tokens = parse_count(args.tokens)
        common = ["--site", args.site, "--tokens", str(args.tokens)]
        one = launch(1, threads, ["--job", "harvest", "--out", str(scratch / "one"), *common])
        many = launch(n, per_rank, ["--job", "harvest", "--out", str(scratch / "many"), *common])
        report["harvest"] = {"tokens": tokens, "one_rank_s": one["seconds"], "n_rank_s": many["seconds"],
                             "one_rank_tok_s": tokens / one["seconds"], "n_rank_tok_s": tokens / many["seconds"],
                             "speedup": one["seconds"] / many["seconds"], "same_store": same_store(scratch / "one", scratch / "many")}
        shutil.rmtree(scratch / "many")

        store = str(scratch / "one")
        train = ["--store", store, "--site", args.site, "--latents", str(args.latents), "--batch", str(args.batch), "--steps", str(args.steps)]
        one = launch(1, threads, ["--job", "train", "--out", str(scratch / "t1"), *train])
        many = launch(n, per_rank, ["--job", "train", "--out", str(scratch / "tn"), "--parallel", "data", *train])
        parameters = one["parameters"]
        reduce = launch(n, per_rank, ["--job", "allreduce", "--values", str(parameters)])
        tokens_trained = args.steps * args.batch
        report["train_data_parallel"] = {
            "parameters": parameters, "steps": args.steps, "batch": args.batch,
            "one_rank_tok_s": tokens_trained / one["seconds"], "n_rank_tok_s": tokens_trained / many["seconds"],
            "speedup": one["seconds"] / many["seconds"], "one_rank_step_s": one["seconds"] / args.steps,
            "n_rank_step_s": many["seconds"] / args.steps,
            "allreduce_bytes_per_rank_per_step": 2 * (n - 1) / n * 4 * parameters, "allreduce_s": reduce["seconds"],
            "latent_rows_touched_per_batch": one["latent_rows_touched"],
        }
        sweep = ",".join(str(16 * 2**i) for i in range(n))
        one = launch(1, threads, ["--job", "train", "--out", str(scratch / "s1"), "--k", sweep, *train])
        many = launch(n, per_rank, ["--job", "train", "--out", str(scratch / "sn"), "--k", sweep, "--parallel", "dictionaries", *train])
        report["train_dictionary_parallel"] = {"k": sweep, "one_rank_tok_s": tokens_trained / one["seconds"],
                                               "n_rank_tok_s": tokens_trained / many["seconds"],
                                               "speedup": one["seconds"] / many["seconds"]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    h, t, s = report["harvest"], report["train_data_parallel"], report["train_dictionary_parallel"]
    print(f"machine: {os.cpu_count()} CPUs; 1 rank x {threads} threads vs {n} ranks x {per_rank} thread(s), gloo")
    print(f"harvest  {args.site}, {h['tokens']:,} tokens: 1 rank {h['one_rank_tok_s']:,.0f} tok/s, {n} ranks "
          f"{h['n_rank_tok_s']:,.0f} tok/s ({h['speedup']:.2f}x); stores identical: {h['same_store']}")
    print(f"train    TopK SAE {D_MODEL} x {args.latents}, k 32, batch {args.batch}, {args.steps} steps: 1 rank "
          f"{t['one_rank_tok_s']:,.0f} tok/s ({t['one_rank_step_s']:.3f} s/step), {n} ranks data-parallel "
          f"{t['n_rank_tok_s']:,.0f} tok/s ({t['n_rank_step_s']:.3f} s/step, {t['speedup']:.2f}x)")
    print(f"         gradient all-reduce: {t['parameters']:,} parameters = {4 * t['parameters'] / 1e6:.1f} MB; ring: "
          f"{t['allreduce_bytes_per_rank_per_step'] / 1e6:.1f} MB sent per rank per step; measured {t['allreduce_s'] * 1e3:.0f} ms; "
          f"one batch's gradient touches {t['latent_rows_touched_per_batch']:.1%} of the latent rows")
    print(f"sweep    k {s['k']}: 1 rank {s['one_rank_tok_s']:,.0f} tok/s, {n} ranks dictionary-parallel "
          f"{s['n_rank_tok_s']:,.0f} tok/s ({s['speedup']:.2f}x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
