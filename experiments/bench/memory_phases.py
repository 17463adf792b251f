"""Where the quick start's memory goes: the exact peak resident memory (RSS) of each phase of `make run`'s job.

    python experiments/bench/memory_phases.py [--tokens 400k] [--store STORE] [--out runs/bench/memory_phases]

Runs `interp train-sae --model smollm2-135m --layer 6 --site resid_post --k 32 --latents 8192
--tokens 400k` in this process and prints, per phase, the peak RSS and the RSS at its end:
loading the model, harvesting the store (only if it is missing), set-up (initialisation sample,
massive-activation test, dictionary), training, and the final evaluation (reconstruction on
held-out rows; the model's loss with the SAE spliced in, whose 49k-token logits are the largest
tensors of the job; saving, with the SAELens export), in MiB. A phase's peak leaves out the phases
nested in it; its "RSS at end" is taken when it ends, after them. Peaks are exact, not sampled:
Linux's VmHWM, reset at every phase boundary (`/proc/self/clear_refs`). The largest is the job's
peak, which `/usr/bin/time -v make run` also reports, plus the CLI's own imports, in kbytes; it is
a separate run, so a peak that moves from run to run can differ. (Resetting VmHWM also lowers what
`/usr/bin/time` would report for this script itself: measure `make run` with it, not this.)
"""

from __future__ import annotations

import argparse
import importlib
import shutil
from pathlib import Path


def status() -> dict[str, int]:
    """VmHWM and VmRSS of this process, in MiB."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmHWM:", "VmRSS:")):
                name, kb = line.split()[:2]
                values[name.rstrip(":")] = int(kb) // 1024
    return values


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS


class Phases:
    """A stack of named phases; a phase's peak leaves out the phases nested in it."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.peaks: dict[str, dict[str, int]] = {}
        self.floor = 0  # RSS when the current phase resumed after a nested one (what that one left, not its own)

    def _close(self, name: str) -> None:
        now = status()
        entry = self.peaks.setdefault(name, {"peak": 0, "end": 0})
        if now["VmHWM"] > self.floor:
            entry["peak"] = max(entry["peak"], now["VmHWM"])
        entry["end"] = now["VmRSS"]
        reset_peak()
        self.floor = 0

    def enter(self, name: str) -> None:
        self._close(self.stack[-1] if self.stack else "outside the phases")
        self.stack.append(name)

    def leave(self) -> None:
        self._close(self.stack.pop())
        self.floor = status()["VmRSS"]

    def wrap(self, owner, attribute: str, name: str) -> None:
        fn = getattr(owner, attribute)

        def wrapped(*a, **kw):
            self.enter(name)
            try:
                return fn(*a, **kw)
            finally:
                self.leave()
        setattr(owner, attribute, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory_phases"))
    parser.add_argument("--tokens", default="400k")
    parser.add_argument("--store", type=Path, default=None, help="default: the quick start's store in the cache dir")
    args = parser.parse_args()
    phases = Phases()
    phases.enter("imports")
    from interp.dictionary import TrainConfig
    from interp.models import load_model

    train_module = importlib.import_module("interp.dictionary.train")  # the package exports a function of that name
    phases.wrap(train_module, "harvest", "harvest")
    phases.wrap(train_module.Trainer, "__init__", "set-up")
    phases.wrap(train_module.Trainer, "run", "training")
    phases.wrap(train_module.Trainer, "finish", "evaluation and saving")  # called at the end of run()
    phases.wrap(train_module, "reconstruction_metrics", "evaluation: reconstruction")
    phases.wrap(train_module, "splice_metrics", "evaluation: CE and KL (logits)")
    phases.wrap(train_module.io, "save_dictionary", "saving")
    phases.wrap(train_module.io, "export_saelens", "saving: SAELens export")

    settings = dict(model="smollm2-135m", layer=6, site="resid_post", k="32", latents=8192, tokens=args.tokens,
                    out=args.out, store=args.store)
    shutil.rmtree(args.out, ignore_errors=True)
    phases.leave()
    phases.enter("model load")
    model = load_model("smollm2-135m")
    phases.leave()
    train_module.train(TrainConfig(**settings), model=model, progress=False)
    phases._close("outside the phases")
    print(f"{'phase (MiB)':34s}{'peak RSS':>12s}{'RSS at end':>12s}")
    for name, entry in phases.peaks.items():
        print(f"{name:34s}{entry['peak']:12,d}{entry['end']:12,d}")
    print(f"peak of the job: {max(e['peak'] for e in phases.peaks.values()):,} MiB")


if __name__ == "__main__":
    main()
