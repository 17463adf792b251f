"""Harvest: run the model over a corpus once and write the activations of every requested site.

One forward pass per batch captures all sites and stops after the deepest one. Shards are
written whole under a temporary name, renamed into place, then recorded in the manifest, all
under the store's writer lock (a second writer waits, or exits naming the holder's pid); a
harvest killed at any moment and started again with the same settings resumes at the first
missing shard and produces exactly the rows of an uninterrupted run (batches are aligned to
shard starts, so every forward pass sees the same batch either way).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interp import distributed
from interp.config import config_dict, opt, parse_count
from interp.data import TokenContexts, load_corpus, token_contexts
from interp.data.contexts import tokenizer_digest
from interp.errors import InputError
from interp.faults import fault_point
from interp.paths import atomic_directory, file_lock
from interp.store import format as fmt
from interp.store.read import ActivationStore


@dataclass
class HarvestConfig:
    out: Path = opt(help="store directory (created; an existing store with the same settings is resumed)")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    sites: str = opt("blocks.12.hook_resid_post", "comma-separated site names")
    corpus: str = opt("shakespeare", "built-in corpus, file, folder, glob or HF dataset id")
    tokens: int = opt(2_000_000, "rows to store (e.g. 500k, 2M); rounded up to whole contexts", parse=parse_count)
    context_len: int = opt(128, "tokens per context")
    batch_size: int = opt(16, "contexts per forward pass")
    dtype: str = opt("float32", "storage dtype: float32, float16 or bfloat16")
    exclude_bos: bool = opt(True, "leave out the BOS position of every context")
    seed: int = opt(0, "seed of the context order")
    shard_contexts: int = opt(512, "contexts per shard")
    device: str = opt("cpu", "device to run the model on")
    wait: bool = opt(True, "if another process is writing this store, wait for it (--no-wait: exit naming its pid)")

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens)  # Python callers may write "2M" too
        self.out = Path(self.out)


def harvest(config: HarvestConfig, *, model: Any = None, progress: bool = True) -> ActivationStore:
    """Write (or resume) the store described by ``config``; returns it opened for reading.

    ``model`` may be an already loaded ``Model`` (then ``config.model`` only names it). Under
    ``torchrun`` with N processes, rank r runs shards r, r + N, r + 2N, ... (see ``interp.distributed``
    and the README's "Scale-out"): the store is the one a single process writes, row for row.
    """
    from interp.models import load_model

    if config.dtype not in fmt.STORAGE_DTYPES:
        raise InputError(f"dtype {config.dtype!r}: choose one of {', '.join(fmt.STORAGE_DTYPES)}")
    if config.batch_size < 1 or config.shard_contexts < 1 or config.shard_contexts % config.batch_size:
        raise InputError(
            f"shard_contexts ({config.shard_contexts}) must be a positive multiple of batch_size ({config.batch_size})"
        )
    ranks = distributed.ranks(config.device)
    model = model if model is not None else load_model(config.model, device=ranks.device(config.device))
    sites = model.site_names([s.strip() for s in config.sites.split(",") if s.strip()])
    widths = {site: _row_width(model, site) for site in sites}
    out = Path(config.out)

    corpus = load_corpus(config.corpus)
    skip = 1 if config.exclude_bos else 0
    per_context = config.context_len - skip
    n_contexts = math.ceil(config.tokens / per_context)
    contexts = token_contexts(corpus, model.tokenizer, context_len=config.context_len, n_contexts=n_contexts, seed=config.seed)
    identity = {
        "model": model.cfg.name,
        "model_fingerprint": weights_fingerprint(model.module),
        "tokenizer": tokenizer_digest(model.tokenizer),
        "sites": widths,
        "dtype": config.dtype,
        "context_len": config.context_len,
        "exclude_bos": config.exclude_bos,
        "corpus": corpus.name,
        "corpus_digest": corpus.digest,
        "contexts_digest": contexts.digest,
        "n_contexts": len(contexts),
        "batch_size": config.batch_size,
        "shard_contexts": config.shard_contexts,
    }
    n_shards = math.ceil(len(contexts) / config.shard_contexts)

    # One writer at a time (readers never wait): rank 0 holds the lock for the whole job, and the
    # other ranks start only once it has it and has prepared the store.
    with contextlib.ExitStack() as held:
        def prepare() -> list[int]:
            """Rank 0: the lock taken, the manifest read or created, orphans removed, space checked."""
            _check_destination(out)
            held.enter_context(store_lock(out, wait=config.wait))
            manifest = _open_or_create(out, identity, config, contexts, model, per_context)
            done = {shard["index"] for shard in manifest["shards"]}
            _remove_orphans(out, done)
            _check_space(out, [i for i in range(n_shards) if i not in done], contexts, config, widths, per_context)
            return sorted(done)

        done = set(ranks.on_main(prepare))
        todo = [i for i in range(n_shards) if i not in done and i % ranks.world_size == ranks.rank]
        mine = sum(min(config.shard_contexts, len(contexts) - i * config.shard_contexts) for i in todo) * per_context
        where = f" (rank {ranks.rank} of {ranks.world_size})" if ranks.active else ""
        bar = tqdm(total=mine, unit="tok", unit_scale=True, desc=f"harvest {out.name}{where}",
                   disable=not (progress and ranks.is_main), smoothing=0.05)
        for index in todo:
            bar.set_postfix_str(f"shard {index + 1}/{n_shards}")
            first, last = index * config.shard_contexts, min((index + 1) * config.shard_contexts, len(contexts))
            arrays = _run_shard(model, contexts, first, last, sites, widths, config, skip, bar)
            bar.set_postfix_str(f"writing shard {index + 1}/{n_shards}")
            files = _write_shard(out, index, arrays)
            _record_shard(out, {"index": index, "contexts": [first, last], "rows": len(arrays["rows"]), "files": files}, n_shards)
        bar.close()
        ranks.barrier()
    return ActivationStore(out)


def _record_shard(out: Path, record: dict, n_shards: int) -> None:
    """Add a renamed shard to the manifest (in index order; complete once all ``n_shards`` are there).

    The manifest is read, changed and atomically replaced under ``manifest.lock``, so the ranks of
    a distributed harvest, each recording its own shards, never lose one another's records.
    """
    with file_lock(out / fmt.MANIFEST_LOCK, what=f"the manifest of {out}"):
        manifest = fmt.read_manifest(out)
        manifest["shards"] = sorted([s for s in manifest["shards"] if s["index"] != record["index"]] + [record],
                                    key=lambda s: s["index"])
        manifest["complete"] = len(manifest["shards"]) == n_shards
        fmt.write_manifest(out, manifest)


def write_arrays(out: str | Path, arrays: dict[str, np.ndarray | torch.Tensor], *, source: str = "external",
                 dtype: str = "float32", rows_per_shard: int = 65_536) -> ActivationStore:
    """A store from activations you already have ({site: [rows, d]}, rows aligned across sites).

    Row metadata is context = row, position = 0, token = document = offset = -1 (unknown).
    """
    out = Path(out)
    if dtype not in fmt.STORAGE_DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(fmt.STORAGE_DTYPES)}")
    tensors = {site: torch.as_tensor(a) for site, a in arrays.items()}
    lengths = {t.shape[0] for t in tensors.values()}
    if len(lengths) != 1 or any(t.ndim != 2 for t in tensors.values()):
        raise InputError("write_arrays needs 2-D arrays with the same number of rows")
    n = lengths.pop()
    _check_destination(out)
    with store_lock(out, wait=False):
        if (out / fmt.MANIFEST).exists():
            raise InputError(f"{out} already holds a store")
        _write_all(out, tensors, n, source, dtype, rows_per_shard)
    return ActivationStore(out)


def _write_all(out: Path, tensors: dict[str, torch.Tensor], n: int, source: str, dtype: str, rows_per_shard: int) -> None:
    manifest = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "identity": {"source": source},
        "model": {"name": source, "family": "external", "n_layers": 0, "d_model": 0, "dtype": dtype},
        "tokenizer": "", "sites": {site: {"d": int(t.shape[1])} for site, t in tensors.items()}, "dtype": dtype,
        "row_columns": list(fmt.ROW_COLUMNS), "context_len": 1, "rows_per_context": 1, "exclude_bos": False,
        "corpus": {"name": source, "digest": "", "stream_tokens": n}, "contexts": {"count": n, "digest": "", "seed": 0, "passes": 1},
        "config": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False, "shards": [],
    }
    fmt.write_manifest(out, manifest)
    for index, start in enumerate(range(0, n, rows_per_shard)):
        stop = min(start + rows_per_shard, n)
        rows = np.full((stop - start, len(fmt.ROW_COLUMNS)), -1, dtype=np.int32)
        rows[:, 0], rows[:, 1] = np.arange(start, stop), 0
        shard = {site: fmt.to_storage(t[start:stop], dtype) for site, t in tensors.items()}
        files = _write_shard(out, index, {**shard, "rows": rows})
        manifest["shards"].append({"index": index, "contexts": [start, stop], "rows": stop - start, "files": files})
        fmt.write_manifest(out, manifest)
    manifest["complete"] = True
    fmt.write_manifest(out, manifest)


def store_lock(out: Path, *, wait: bool = True):
    """The store's writer lock (``writer.lock`` inside it): harvests and ``write_arrays`` hold it while
    they write; readers never take it. Orphan shards are removed only under it, so never a live
    writer's."""
    return file_lock(out / fmt.LOCK, what=f"the store {out}", wait=wait)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap digest of the weights: every tensor's name, shape and first/last values."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat[:64].float().cpu().numpy().tobytes() + flat[-64:].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _row_width(model: Any, site: str) -> int:
    info = model.site_table.info(site)
    if info.pos_dim != 1 or any(isinstance(s, str) for s in info.shape[2:]):
        raise InputError(f"site {site} has no fixed-size vector per token (shape {info.shape}); it cannot be stored")
    return int(np.prod(info.shape[2:]))


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    if out.is_dir() and any(p.name != fmt.LOCK for p in out.iterdir()) and not (out / fmt.MANIFEST).exists():
        raise InputError(f"{out} is a non-empty folder without a store manifest; refusing to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"cannot write to {out}: {err.strerror or err}") from err


def _open_or_create(out: Path, identity: dict, config: HarvestConfig, contexts: TokenContexts, model: Any, per_context: int) -> dict:
    if (out / fmt.MANIFEST).exists():
        manifest = fmt.read_manifest(out)
        differ = {k: (manifest["identity"].get(k), v) for k, v in identity.items() if manifest["identity"].get(k) != v}
        if differ:
            lines = "\n".join(f"  {k}: store has {old!r}, this run has {new!r}" for k, (old, new) in differ.items())
            raise InputError(f"{out} holds a store made with other settings; refusing to mix them:\n{lines}")
        return manifest
    manifest = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "identity": identity,
        "model": {"name": model.cfg.name, "family": model.cfg.family, "n_layers": model.cfg.n_layers,
                  "d_model": model.cfg.d_model, "dtype": str(model.dtype).removeprefix("torch.")},
        "tokenizer": getattr(model.tokenizer, "name_or_path", "") or type(model.tokenizer).__name__,
        "sites": {site: {"d": d} for site, d in identity["sites"].items()},
        "dtype": config.dtype,
        "row_columns": list(fmt.ROW_COLUMNS),
        "context_len": config.context_len,
        "rows_per_context": per_context,
        "exclude_bos": config.exclude_bos,
        "corpus": {"name": contexts.corpus, "digest": contexts.corpus_digest, "stream_tokens": contexts.stream_tokens},
        "contexts": {"count": len(contexts), "digest": contexts.digest, "seed": contexts.seed, "passes": contexts.passes},
        "config": config_dict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
        "shards": [],
    }
    fmt.write_manifest(out, manifest)
    return manifest


def _remove_orphans(out: Path, done: set[int]) -> None:
    """Temp dirs of a killed run, and shards renamed into place but never recorded."""
    shards = out / "shards"
    if not shards.exists():
        return
    for path in shards.iterdir():
        if path.name.startswith(".") or (path.name.isdigit() and int(path.name) not in done):
            shutil.rmtree(path)


def _check_space(out: Path, todo: list[int], contexts: TokenContexts, config: HarvestConfig, widths: dict, per_context: int) -> None:
    item = fmt.STORAGE_DTYPES[config.dtype][1].itemsize
    remaining = sum(min(config.shard_contexts, len(contexts) - i * config.shard_contexts) for i in todo) * per_context
    need = remaining * (sum(widths.values()) * item + 4 * len(fmt.ROW_COLUMNS))
    free = shutil.disk_usage(out).free
    if need > free:
        raise InputError(f"{out} needs {need / 1e9:.2f} GB for the remaining {remaining:,} rows but has {free / 1e9:.2f} GB free")


def _run_shard(model: Any, contexts: TokenContexts, first: int, last: int, sites: list[str], widths: dict,
               config: HarvestConfig, skip: int, bar: tqdm) -> dict[str, np.ndarray]:
    per_context = config.context_len - skip
    n_rows = (last - first) * per_context
    np_dtype = fmt.STORAGE_DTYPES[config.dtype][1]
    arrays = {site: np.empty((n_rows, widths[site]), dtype=np_dtype) for site in sites}
    arrays["rows"] = _row_table(contexts, first, last, skip)
    for start in range(first, last, config.batch_size):
        stop = min(start + config.batch_size, last)
        ids = torch.from_numpy(contexts.tokens[start:stop]).long()
        cache = model.run_with_cache(ids, sites)
        lo, hi = (start - first) * per_context, (stop - first) * per_context
        for site in sites:
            act = cache[site][:, skip:].reshape(hi - lo, -1)
            if not torch.isfinite(act).all():
                bad = int((~torch.isfinite(act)).any(-1).nonzero()[0])
                raise InputError(f"{site}: non-finite activation at context {start + bad // per_context}")
            arrays[site][lo:hi] = fmt.to_storage(act, config.dtype)
        bar.update(hi - lo)
        fault_point("harvest.batch")
    return arrays


def _row_table(contexts: TokenContexts, first: int, last: int, skip: int) -> np.ndarray:
    n, width = last - first, contexts.context_len - skip
    context = np.repeat(np.arange(first, last, dtype=np.int32), width)
    position = np.tile(np.arange(skip, contexts.context_len, dtype=np.int32), n)
    columns = [context, position] + [a[first:last, skip:].reshape(-1) for a in (contexts.tokens, contexts.doc_ids, contexts.doc_positions)]
    return np.stack(columns, axis=1).astype(np.int32)


def _write_shard(out: Path, index: int, arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """Write every array of one shard into a temporary folder renamed into place when whole; file records."""
    files = {}
    try:
        with atomic_directory(fmt.shard_dir(out, index)) as tmp:
            for name, array in arrays.items():
                filename = "rows.npy" if name == "rows" else fmt.site_file(name)
                with open(tmp / filename, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                files[filename] = {"bytes": (tmp / filename).stat().st_size, "sha256": fmt.sha256_file(tmp / filename)}
            fault_point("harvest.shard-written")
    except OSError as err:
        recorded = fmt.read_manifest(out)["shards"]
        raise InputError(
            f"writing shard {index} to {out} failed ({err.strerror or err}); the {len(recorded)} complete shards "
            f"({sum(s['rows'] for s in recorded):,} rows) are intact: fix the problem and run the same command to resume"
        ) from err
    fault_point("harvest.shard-renamed")
    return files
