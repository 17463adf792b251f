"""interp's tuned lens (trained from the activation store) against the `tuned-lens` package 0.2.0.

    python experiments/bench/bench_tuned_lens.py [--package-python PATH] [--out runs/bench/tuned_lens.json]

Both train on the same tokens: the training contexts of experiments/lens_kl.py's store (harvested
by that script), the same number of steps of the same number of contexts, in this run, one after
the other. interp reads residuals from the store; the package runs the model forward at every
step (its own `Train.execute` loop, unchanged, fed those contexts). Both lenses are then
evaluated by one code path (interp's `evaluate_lenses`, unembedding in bfloat16) on the same test
tokens. Times are wall-clock and CPU seconds (all threads) of each training loop, setup excluded.

The package cannot be installed beside interp's pins: its training loop imports
`torchdata.dataloader2`, removed from torchdata after 0.8 (pip would install 0.11), and it calls
`from_pretrained(..., load_in_8bit=...)`, which transformers 5 (interp's) rejects. So it runs in
its own virtual environment (same torch 2.13.0, transformers 4.46.3, torchdata 0.8.0):

    python3 -m venv $INTERP_HOME/venv-tuned-lens
    $INTERP_HOME/venv-tuned-lens/bin/pip install torch==2.13.0 tuned-lens==0.2.0 torchdata==0.8.0 transformers==4.46.3

transformers 4.46 reads neither the converted model's `rope_parameters` nor its tokenizer class,
so the package gets a copy of the config with `rope_theta` spelled out and a plain fast-tokenizer
config (same weights by symlink, same tokenizer.json); the script checks that the package's model
computes the same logits as interp's before timing anything.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lens_kl import lens_store, splits  # noqa: E402

from interp.lens import AffineLens, LensTrainConfig, evaluate_lenses, train_tuned_lens  # noqa: E402
from interp.lens.train import lens_store_sites  # noqa: E402
from interp.models import load_model  # noqa: E402
from interp.models.embedded import embedded_model_folder  # noqa: E402
from interp.paths import interp_home, write_json  # noqa: E402

DRIVER = Path(__file__).with_name("tuned_lens_package_run.py")


def compat_folder(source: Path, target: Path) -> Path:
    """The converted model as transformers 4.46 reads it (weights symlinked, not copied)."""
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    config["torch_dtype"] = config.pop("dtype", "float32")
    (target / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(source / "tokenizer.json", target / "tokenizer.json")
    tok = json.loads((source / "tokenizer_config.json").read_text())
    keep = {k: tok[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tok}
    (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **keep}))
    link = target / "model.safetensors"
    if not link.exists():
        link.symlink_to(source / "model.safetensors")
    return target


def training_contexts(store, rows: tuple[int, int], bos: int) -> np.ndarray:
    """The training rows' token contexts (BOS + 127 tokens each), rebuilt from the store's row table."""
    table = store.rows(slice(*rows))
    per = int(store.manifest["rows_per_context"])
    tokens = table[:, 2].reshape(-1, per)
    return np.concatenate([np.full((len(tokens), 1), bos, dtype=np.int64), tokens.astype(np.int64)], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package-python", type=Path, default=None, help="default: INTERP_HOME/venv-tuned-lens/bin/python")
    parser.add_argument("--steps", type=int, default=52, help="steps (52 x 8 contexts = one epoch of the training contexts)")
    parser.add_argument("--contexts-per-step", type=int, default=8)
    parser.add_argument("--choices", type=Path, default=Path("runs/lens_kl/choices.json"),
                        help="interp's optimizer and lr as chosen on dev by lens_kl.py (else adam 1e-3)")
    parser.add_argument("--optimizer", default=None, help="interp's optimizer (overrides --choices)")
    parser.add_argument("--compute-dtype", default="auto",
                        help="interp's unembedding matmul dtype in training (auto: bfloat16 where the CPU has it natively; "
                             "float32 is the control for the package, which trains in float32)")
    parser.add_argument("--lr", type=float, default=None, help="interp's learning rate (overrides --choices)")
    parser.add_argument("--test-contexts", type=int, default=None, help="evaluate on the first N test contexts (default: all 64)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tuned_lens.json"))
    args = parser.parse_args()
    python = args.package_python or interp_home() / "venv-tuned-lens" / "bin" / "python"
    if not python.exists():
        sys.exit(f"no `tuned-lens` environment at {python}; create it as this script's docstring says")
    model = load_model("smollm2-135m")
    store = lens_store(interp_home() / "stores" / "lens-resid", model)
    rows = splits(store)
    sites = lens_store_sites(model, store, "resid_pre")
    per = int(store.manifest["rows_per_context"])
    if args.test_contexts is not None:
        rows["test"] = (rows["test"][0], min(rows["test"][1], rows["test"][0] + args.test_contexts * per))
    optimizer, lr = "adam", 1e-3
    if args.choices.exists():
        chosen = json.loads(args.choices.read_text())["tuned"]
        optimizer, lr = chosen["optimizer"], chosen["lr"]
    optimizer, lr = args.optimizer or optimizer, args.lr or lr
    work = Path(tempfile.mkdtemp(prefix="bench-tuned-lens-", dir=interp_home()))
    result = {"steps": args.steps, "contexts_per_step": args.contexts_per_step, "interp_optimizer": optimizer, "interp_lr": lr,
              "interp_compute_dtype": args.compute_dtype,
              "train_rows": rows["train"], "test_rows": rows["test"], "load_average_start": os.getloadavg()}

    # The package: same contexts, same steps; first check its model computes interp's logits.
    contexts = training_contexts(store, rows["train"], model.tokenizer.bos_token_id)
    np.save(work / "contexts.npy", contexts)
    folder = compat_folder(embedded_model_folder("smollm2-135m"), interp_home() / "tuned-lens-compat" / "smollm2-135m")
    check = subprocess.run([str(python), "-c", (
        "import sys, numpy as np, torch; from transformers import AutoModelForCausalLM as M;"
        f"m = M.from_pretrained('{folder}', torch_dtype=torch.float32).eval();"
        f"ids = torch.from_numpy(np.load('{work / 'contexts.npy'}')[:2]);"
        f"np.save('{work / 'check.npy'}', m(ids).logits[:, -4:].detach().numpy())")], capture_output=True, text=True)
    if check.returncode:
        sys.exit(f"the package's environment could not run the model:\n{check.stderr[-2000:]}")
    with torch.no_grad():
        ours = model(torch.from_numpy(contexts[:2]))[:, -4:].numpy()
    result["logit_check_max_abs_diff"] = float(np.abs(np.load(work / "check.npy") - ours).max())
    if result["logit_check_max_abs_diff"] > 1e-3:
        sys.exit(f"the package's model differs from interp's (max logit difference {result['logit_check_max_abs_diff']:.3g})")

    started = time.perf_counter()
    run = subprocess.run([str(python), str(DRIVER), "--model", str(folder), "--tokenizer", str(folder), "--contexts",
                          str(work / "contexts.npy"), "--out", str(work / "package"), "--steps", str(args.steps),
                          "--tokens-per-step", str(args.contexts_per_step * contexts.shape[1]), "--batch", str(args.contexts_per_step)],
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"the package's training failed:\n{run.stderr[-3000:]}")
    result["package"] = {**json.loads((work / "package" / "timings.json").read_text()), "wall_s": time.perf_counter() - started}
    from safetensors.torch import load_file

    tensors = load_file(work / "package" / "translators.safetensors")
    package_lens = AffineLens.identity(model, sites)
    with torch.no_grad():
        package_lens.weight.copy_(tensors["weight"])
        package_lens.bias.copy_(tensors["bias"])

    # interp, from the store: same rows, same number of steps.
    config = LensTrainConfig(store=store.root, lens="tuned", out=work / "interp", holdout=store.n_rows - rows["train"][1],
                             steps=args.steps, batch_size=args.contexts_per_step * per, optimizer=optimizer, lr=lr,
                             warmup=max(1, args.steps // 10), compute_dtype=args.compute_dtype)
    started, cpu = time.perf_counter(), time.process_time()
    ours_lens = train_tuned_lens(config, model=model)
    result["interp"] = {"train_seconds": ours_lens.meta["train_seconds"], "wall_s": time.perf_counter() - started,
                        "train_cpu_seconds": time.process_time() - cpu}
    # What the store cost to make, for these rows: one forward over the same contexts with the 31 sites cached.
    sample = torch.from_numpy(contexts[:32])
    started = time.perf_counter()
    for part in sample.split(16):
        model.run_with_cache(part, [*sites, "blocks.29.hook_resid_post"])
    result["interp"]["harvest_seconds_estimate"] = (time.perf_counter() - started) * len(contexts) / len(sample)
    result["load_average_end"] = os.getloadavg()

    # bfloat16 unembedding matmuls for both (lens_kl.py bounds the difference to float32 on this store)
    table = evaluate_lenses(model, store, {"interp": ours_lens, "tuned-lens 0.2.0": package_lens}, sites, rows["test"],
                            compute_dtype=torch.bfloat16)
    wide = table.pivot(index="layer", columns="lens", values="kl")
    result["kl"] = wide.reset_index().to_dict("records")
    result["mean_kl"] = table.groupby("lens")["kl"].mean().to_dict()
    result["kl_ratio_interp_over_package"] = result["mean_kl"]["interp"] / result["mean_kl"]["tuned-lens 0.2.0"]
    result["speedup_train"] = result["package"]["train_seconds"] / result["interp"]["train_seconds"]
    result["speedup_train_cpu"] = result["package"]["train_cpu_seconds"] / result["interp"]["train_cpu_seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"test tokens {int(table.tokens.iloc[0]):,}; {args.steps} steps x {args.contexts_per_step} contexts, the same training contexts")
    print(wide.round(4).to_string())
    print("mean KL over layers: " + ", ".join(f"{k} {v:.4f}" for k, v in result["mean_kl"].items()))
    print(f"KL interp / package: {result['kl_ratio_interp_over_package']:.3f}")
    print(f"training time: interp {result['interp']['train_seconds']:.1f} s from the store; package {result['package']['train_seconds']:.1f} s "
          f"-> interp {result['speedup_train']:.2f}x faster (CPU time: {result['interp']['train_cpu_seconds']:.0f} s vs "
          f"{result['package']['train_cpu_seconds']:.0f} s, {result['speedup_train_cpu']:.2f}x); harvesting those rows once: about "
          f"{result['interp']['harvest_seconds_estimate']:.0f} s, shared with every other use of the store")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
