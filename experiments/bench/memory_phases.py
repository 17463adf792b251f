"""Where the quick start's memory goes: peak resident memory (RSS) per phase of `make run`'s job.

    python experiments/bench/memory_phases.py [--tokens 400k] [--store STORE] [--out runs/bench/memory_phases]

Runs `interp train-sae --model smollm2-135m --layer 6 --site resid_post --k 32 --latents 8192
--tokens 400k` in this process while a thread samples VmRSS every
20 ms, and prints the peak of each phase: loading the model, harvesting the store (only if it is
missing), training, and the final evaluation (reconstruction on held-out rows, then the model's
loss with the SAE spliced in, whose 49k-token logits are the largest tensors of the job), with
the file-backed part (RssFile: memory-mapped store pages, shared libraries) beside it. The whole
job's peak, as `/usr/bin/time -v make run` reports it, is the largest of them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path


def status() -> dict[str, int]:
    """VmRSS and RssFile of this process, in MB."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "RssFile:")):
                name, kb = line.split()[:2]
                values[name.rstrip(":")] = int(kb) // 1024
    return values


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase, self.peaks = "start", {}

    def run(self) -> None:
        while True:
            now = status()
            peak = self.peaks.setdefault(self.phase, {"VmRSS": 0, "RssFile": 0})
            if now["VmRSS"] > peak["VmRSS"]:
                peak.update(now)
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory_phases"))
    parser.add_argument("--tokens", default="400k")
    parser.add_argument("--store", type=Path, default=None, help="default: the quick start's store in the cache dir")
    args = parser.parse_args()
    sampler = Sampler()
    sampler.start()

    import importlib

    import interp.store.write as write
    from interp.dictionary import TrainConfig
    from interp.models import load_model

    train_module = importlib.import_module("interp.dictionary.train")  # the module (the package exports a function of that name)

    def phase(name, fn):
        def wrapped(*a, **kw):
            previous, sampler.phase = sampler.phase, name
            try:
                return fn(*a, **kw)
            finally:
                sampler.phase = previous
        return wrapped

    write_harvest = write.harvest
    train_module.harvest = phase("harvest", write_harvest)
    Trainer = train_module.Trainer
    Trainer.finish = phase("evaluation", Trainer.finish)
    Trainer.run = phase("training", Trainer.run)

    settings = dict(model="smollm2-135m", layer=6, site="resid_post", k="32", latents=8192, tokens=args.tokens,
                    out=args.out, store=args.store)
    shutil.rmtree(args.out, ignore_errors=True)
    sampler.phase = "model load"
    model = load_model("smollm2-135m")
    sampler.phase = "set-up"
    train_module.train(TrainConfig(**settings), model=model, progress=False)
    time.sleep(0.1)
    print(f"{'phase':14s}{'peak RSS MB':>12s}{'of it file-backed':>20s}")
    for name, peak in sampler.peaks.items():
        print(f"{name:14s}{peak['VmRSS']:12,d}{peak['RssFile']:20,d}")
    print(f"peak of the job: {max(p['VmRSS'] for p in sampler.peaks.values()):,} MB")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
