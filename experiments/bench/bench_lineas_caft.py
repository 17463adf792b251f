"""LinEAS fit time and the cost of a CAFT step (issue: LinEAS and CAFT).

    python experiments/bench/bench_lineas_caft.py [--threads N] [--repeats 7]

SmolLM2-135M, float32, CPU:

1. A LinEAS fit on 32 + 32 sentiment texts over 8 layers (``blocks.2..9.hook_resid_post``) with
   the ``interp lineas fit`` defaults, wall-clock, end to end (target activations and the blocks
   below the first map, run once, included); target: under 120 s. Also the seconds per step.
2. One CAFT step against one plain LoRA step on the same batch (16 sentences of the CAFT task,
   LoRA rank 8 on every attention and MLP projection), the CAFT step with 8 directions projected
   out at each of 3 layers; interleaved repeats, medians; target: ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-fit", action="store_true", help="only the CAFT step comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import interp
    from interp.intervene import ProjectOut
    from interp.steering import fit_lineas
    from interp.steering.caft import LORA_TARGETS, _answer_ids, load_task, train_step
    from interp.steering.lineas_job import LineasFitConfig
    from interp.steering.lora import add_lora
    from timing import interleaved, report

    model = interp.load_model("smollm2-135m")
    extra = {"threads": torch.get_num_threads()}
    if not args.skip_fit:
        config = LineasFitConfig()
        source, target = config.texts()
        sites = [model.site("resid_post", layer) for layer in range(2, 10)]
        start = time.perf_counter()
        maps = fit_lineas(model, source, target, sites, steps=config.steps, lr=config.lr, l1=config.l1, group=config.group,
                          seed=config.seed, progress=False)
        seconds = time.perf_counter() - start
        verdict = "ok" if seconds < 120 else "MISSED"
        print(f"LinEAS fit: {len(source)} + {len(target)} texts, {len(sites)} layers, {config.steps} steps: {seconds:.1f} s "
              f"({seconds / config.steps:.2f} s per step), target < 120 s: {verdict}; "
              f"{sum(maps.active_units().values())} of {len(sites) * model.cfg.d_model} units changed")
        extra["lineas_fit_s"] = seconds

    task = load_task()
    batch = task.train[:16]
    ids = _answer_ids(model, task.answers)
    params = add_lora(model.module, LORA_TARGETS, rank=8, alpha=16)
    optimizer = torch.optim.AdamW(params, lr=1e-5)  # tiny steps: the weights stay close to the same point
    gen = torch.Generator().manual_seed(0)
    directions = [ProjectOut(model.site("resid_post", layer), torch.randn(8, model.cfg.d_model, generator=gen))
                  for layer in (4, 8, 12)]

    def caft_step() -> None:
        with model.intervene(*directions):
            train_step(model, batch, optimizer, ids)

    times = interleaved({"plain LoRA step": lambda: train_step(model, batch, optimizer, ids), "CAFT step (3 x 8 directions)": caft_step},
                        repeats=args.repeats)
    report("CAFT step vs plain LoRA step (16 sentences, SmolLM2-135M)", times, "plain LoRA step",
           targets={"CAFT step (3 x 8 directions)": 1.1}, out=RESULTS / "lineas_caft.json", extra=extra)
    print(f"fastest: plain {min(times['plain LoRA step']):.3f} s, CAFT {min(times['CAFT step (3 x 8 directions)']):.3f} s")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
