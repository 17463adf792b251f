"""Activation-store benchmark (issue: store): read throughput and harvest throughput.

    python experiments/bench/bench_store.py [--tokens 500k] [--batch 4096]

Reads, on a store of >= 1 GB (SmolLM2 layer-12 residual, float32; harvested once into the
cache dir and reused), all served from the page cache (each case is warmed first):
  raw memmap copy        the same bytes as one flat .npy, copied batch by batch (NumPy, into one
                         reused buffer)                                           <- baseline (sequential)
  raw memmap, torch      the same copy with torch (multi-threaded, fresh tensor per batch), for reference
  store, sequential      ActivationStore.batches(shuffle=False)
  SAELens format, seq.   the same rows as a HF-datasets Arrow dataset in SAELens's cached-activation
                         layout (one row per context, Array2D(context, d)), read as SAELens does
  raw memmap gather      sorted random rows of the flat memmap (np.take into a reused buffer) <- baseline (shuffled)
  raw memmap, torch      the same gather with torch.index_select, for reference
  store, shuffled        ActivationStore.batches(shuffle=True): token-level, every row once per epoch;
                         each timed pass reads a new epoch, so the cost of the epoch's order is counted
  ... full permutation   the same reader with the order it had before the keyed bijection (a full int64
                         permutation of the rows per epoch), for the regression check
  ... unmapped (pread)   the same through ActivationStore(keep_pages=False), as the trainer reads: rows
                         copied with pread, nothing mapped (resident memory holds the batch, no more)
  SAELens format, shuf.  as SAELens shuffles: random whole contexts taken from the Arrow dataset, then
                         their tokens permuted (a context-level shuffle plus mixing; true token-level
                         random access in this layout would read nearly every context per batch)

Harvest, on the same contexts (batch 16 x 128), float32:
  full forward           the plain HF forward through all 30 layers and the LM head
  forward to layer 12    the plain HF base model with only its first 13 blocks
  harvest                interp's harvest of blocks.12.hook_resid_post (write, checksum, fsync included)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")  # torch.from_numpy on a read-only memmap warns; nothing writes to it
RESULTS = Path(__file__).resolve().parents[2] / "runs" / "bench"
SITE = "blocks.12.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="500k", help="rows in the benchmark store (500k x 576 x 4 B = 1.15 GB)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--shuffled-batches", type=int, default=120)
    parser.add_argument("--harvest-contexts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-harvest", dest="harvest", action="store_false", help="only the read benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS / "store.json")
    args = parser.parse_args()

    import interp
    from interp.paths import interp_home
    from interp.store import ActivationStore, HarvestConfig, harvest
    from interp.store import read as read_module
    from timing import interleaved, report

    model = interp.load_model("smollm2-135m")
    root = interp_home() / "bench" / f"store-l12-{args.tokens}"
    config = HarvestConfig(out=root, sites=SITE, tokens=args.tokens, batch_size=16, shard_contexts=512)
    store = harvest(config, model=model)  # resumes / returns at once when complete
    size = store.n_rows * store.d(SITE) * 4
    print(f"store: {store.n_rows:,} rows, {size / 1e9:.2f} GB of activations")

    flat = root.parent / f"{root.name}-flat.npy"
    if not flat.exists():
        np.save(flat, store.read(SITE, dtype=None).numpy())
    raw = np.load(flat, mmap_mode="r")
    arrow = arrow_copy(store, root.parent / f"{root.name}-saelens")

    n, batch = store.n_rows, args.batch
    rng = np.random.default_rng(0)
    shuffled = [np.sort(rng.choice(n, batch, replace=False)) for _ in range(args.shuffled_batches)]
    shuffled_torch = [torch.from_numpy(rows) for rows in shuffled]
    gathered = len(shuffled) * batch * store.d(SITE) * 4
    buffer = np.empty((batch, store.d(SITE)), dtype=np.float32)

    def raw_sequential() -> None:
        for start in range(0, n - batch + 1, batch):
            np.copyto(buffer, raw[start : start + batch])

    raw_torch = torch.from_numpy(raw)

    def raw_torch_sequential() -> None:
        for start in range(0, n - batch + 1, batch):
            torch.empty(batch, store.d(SITE)).copy_(raw_torch[start : start + batch])

    def raw_torch_gather() -> None:
        for rows in shuffled_torch:
            torch.index_select(raw_torch, 0, rows)

    def store_sequential() -> None:
        for _ in store.batches(SITE, batch, dtype=None, drop_last=True):
            pass

    def raw_gather() -> None:
        for rows in shuffled:
            np.take(raw, rows, axis=0, out=buffer)

    loader = store.batches(SITE, batch, shuffle=True, seed=0, dtype=None)
    unmapped = ActivationStore(root, keep_pages=False).batches(SITE, batch, shuffle=True, seed=0, dtype=None)

    def read_new_epoch(reader) -> None:
        # every call reads a new epoch, as training does: the epoch's order is part of the cost
        reader.epoch += 1
        for index in range(len(shuffled)):
            reader.read_batch(index)

    def store_shuffled() -> None:
        read_new_epoch(loader)

    def store_shuffled_unmapped() -> None:
        read_new_epoch(unmapped)

    full = store.batches(SITE, batch, shuffle=True, seed=0, dtype=None)

    def store_shuffled_full_permutation() -> None:
        bijection = read_module.RowPermutation
        read_module.RowPermutation = FullPermutation
        try:
            read_new_epoch(full)
        finally:
            read_module.RowPermutation = bijection

    per_context = store.manifest["rows_per_context"]

    def saelens_sequential() -> None:
        contexts = batch // per_context
        for start in range(0, len(arrow) - contexts + 1, contexts):
            arrow[start : start + contexts][SITE].reshape(-1, store.d(SITE))

    context_batches = [rng.choice(len(arrow), batch // per_context, replace=False) for _ in shuffled]

    def saelens_shuffled() -> None:
        for contexts in context_batches:
            block = arrow[contexts.tolist()][SITE].reshape(-1, store.d(SITE))
            block[torch.randperm(block.shape[0])]

    sequential_bytes = (n // batch) * batch * store.d(SITE) * 4
    timed = interleaved({"raw memmap copy": raw_sequential, "raw memmap copy, torch": raw_torch_sequential,
                         "store, sequential": store_sequential, "SAELens format, sequential": saelens_sequential},
                        repeats=args.repeats)
    seq = report(f"Sequential read, {sequential_bytes / 1e9:.2f} GB per pass, batch {batch}", timed, "raw memmap copy",
                 targets={"store, sequential": 1 / 0.7})
    timed = interleaved({"raw memmap gather": raw_gather, "raw memmap gather, torch": raw_torch_gather,
                         "store, shuffled": store_shuffled, "store, shuffled, full permutation (before)": store_shuffled_full_permutation,
                         "store, shuffled, unmapped (pread, trainer)": store_shuffled_unmapped,
                         "SAELens format, shuffled": saelens_shuffled},
                        repeats=args.repeats)
    shuf = report(f"Token-level shuffled read, {gathered / 1e9:.2f} GB per pass, batch {batch}", timed,
                  "raw memmap gather", targets={"store, shuffled": 1 / 0.5})
    order = epoch_order_seconds(store.batches(SITE, batch, shuffle=True, seed=0, dtype=None), args.repeats)
    print(f"shuffled order alone (every batch's sorted rows of one epoch of {n:,} rows, no reads): {order * 1e3:.2f} ms per epoch")
    for title, result, total in (("sequential", seq, sequential_bytes), ("shuffled", shuf, gathered)):
        print(f"{title:10s} throughput: " + ", ".join(
            f"{row['case']} {total / row['median_s'] / 1e9:.2f} GB/s ({1 / row['ratio']:.0%} of raw)" for row in result["rows"]))

    harvest_rows = harvest_benchmark(model, args, interleaved, report, ActivationStore, HarvestConfig, harvest) if args.harvest else None
    if args.out:
        import json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sequential": seq, "shuffled": shuf, "epoch_order_s": order, "harvest": harvest_rows}, indent=1))
        print(f"wrote {args.out}")


class FullPermutation:
    """The order the store used before the keyed bijection: an int64 permutation of every row, drawn per epoch."""

    def __init__(self, n: int, key: list[int]):
        self.rows = np.random.default_rng(list(key)).permutation(n)

    def __getitem__(self, positions):
        return self.rows[positions]


def epoch_order_seconds(reader, repeats: int) -> float:
    """Median time to compute every batch's sorted rows for a new epoch, without reading them."""
    import time

    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        reader.epoch += 1
        start = time.perf_counter()
        for index in range(len(reader)):
            reader.rows_of(index)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def arrow_copy(store, path: Path):
    """The store's rows in SAELens's cached-activation layout (written once, reused)."""
    import datasets

    per_context, d = store.manifest["rows_per_context"], store.d(SITE)
    if not path.exists():
        features = datasets.Features({
            SITE: datasets.Array2D(shape=(per_context, d), dtype="float32"),
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=per_context),
        })
        parts = []
        contexts = store.n_rows // per_context
        step = 512
        for start in range(0, contexts, step):
            stop = min(start + step, contexts)
            rows = slice(start * per_context, stop * per_context)
            acts = store.read(SITE, rows).numpy().reshape(stop - start, per_context, d)
            tokens = store.rows(rows)[:, 2].reshape(stop - start, per_context)
            parts.append(datasets.Dataset.from_dict({SITE: acts, "token_ids": tokens}, features=features))
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
        datasets.concatenate_datasets(parts).save_to_disk(str(tmp))
        tmp.rename(path)
    dataset = datasets.load_from_disk(str(path))
    dataset.set_format(type="torch", columns=[SITE], dtype=torch.float32)  # as SAELens's ActivationsStore does
    return dataset


def harvest_benchmark(model, args, interleaved, report, ActivationStore, HarvestConfig, harvest) -> dict:
    from interp.data import load_corpus, token_contexts

    contexts = token_contexts(load_corpus("shakespeare"), model.tokenizer, n_contexts=args.harvest_contexts)
    ids = torch.from_numpy(contexts.tokens).long()
    batches = ids.split(16)
    base = model.module.model  # the HF base model: embeddings, blocks, final norm (no LM head)
    scratch = Path(tempfile.mkdtemp())

    def full_forward() -> None:
        for chunk in batches:
            model.module(input_ids=chunk, use_cache=False)

    def forward_to_12() -> None:
        base.config.num_hidden_layers = 13
        try:
            for chunk in batches:
                base(input_ids=chunk, use_cache=False)
        finally:
            base.config.num_hidden_layers = model.cfg.n_layers

    def harvested() -> None:
        out = scratch / "h"
        shutil.rmtree(out, ignore_errors=True)
        harvest(HarvestConfig(out=out, sites=SITE, tokens=args.harvest_contexts * 127, batch_size=16, shard_contexts=16 * 4),
                model=model, progress=False)

    with torch.no_grad():
        timed = interleaved({"full forward (30 layers + LM head)": full_forward, "forward to layer 12 (13 blocks)": forward_to_12,
                             "harvest of blocks.12.hook_resid_post": harvested}, repeats=args.repeats)
    result = report(f"Harvest, {args.harvest_contexts} contexts x 128 tokens, batch 16, float32", timed,
                    "full forward (30 layers + LM head)")
    to12 = statistics.median(timed["forward to layer 12 (13 blocks)"])
    mine = statistics.median(timed["harvest of blocks.12.hook_resid_post"])
    tokens = args.harvest_contexts * 128
    print(f"harvest / forward-to-12 = {mine / to12:.3f} (target <= 1.15); harvest {tokens / mine:,.0f} tok/s")
    result["harvest_over_forward_to_12"] = mine / to12
    shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
