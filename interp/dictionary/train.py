"""Training SAEs and transcoders from the activation store.

``train(TrainConfig(...))`` (or ``interp train-sae`` / ``interp train-transcoder``):
1. finds or harvests the store holding the input (and output) site, plus a held-out tail of
   ``eval_tokens`` rows that training never reads;
2. trains one dictionary per value of ``k`` in lockstep from one read of the store (Adam, linear
   warm-up and decay, unit-norm decoder rows, AuxK on latents dead for ``auxk_dead_tokens``);
3. checkpoints every ``checkpoint_every`` steps (``checkpoint.py``: versioned folders and an
   atomically replaced pointer, so a crash at any moment leaves a checkpoint) and resumes exactly
   with ``--resume``;
4. evaluates every dictionary (``metrics.py``), prints the table and writes ``metrics.json``, the
   dictionaries (own format) and their SAELens exports.

Under ``torchrun`` the same call runs data-parallel or dictionary-parallel (``parallel.py``).

A batch with a NaN/inf activation stops training with the store row that holds it; the last
checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import interp_kernels as K
from interp import distributed
from interp.config import config_dict, opt, parse_count
from interp.dictionary import checkpoint, io
from interp.dictionary.metrics import metrics_table, reconstruction_metrics, rows_fvu, splice_metrics
from interp.dictionary.parallel import BatchReduce, merge_histories, parallel_mode
from interp.dictionary.sae import DictionaryConfig, SparseDictionary, jumprelu_l0
from interp.dictionary.schedule import (MASSIVE_SAMPLE_ROWS, MASSIVE_SHARE, SELECTION_ROWS, Schedule, massive_share_in,
                                       resolve_schedule)
from interp.errors import InputError, TrainingError
from interp.faults import fault_point
from interp.paths import file_lock, interp_home, write_json
from interp.store import ActivationStore, HarvestConfig, harvest


@dataclass
class TrainConfig:
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id; 'none' trains on an existing --store alone")
    layer: int = opt(12, "layer of the site (ignored when --site is a full name)")
    site: str = opt("resid_post", "input site: short kind (resid_post, mlp_out, ln2...) or full name")
    output_site: str = opt("", "transcoders: the output site (e.g. mlp_out); empty for an SAE")
    architecture: str = opt("topk", "topk, batchtopk, jumprelu or relu")
    k: str = opt("32", "active latents per token; a comma-separated list trains a sweep in lockstep")
    latents: int = opt(8192, "dictionary size")
    tokens: int = opt(2_000_000, "training tokens (e.g. 500k, 2M)", parse=parse_count)
    corpus: str = opt("shakespeare", "corpus to harvest from when the store does not exist yet")
    store: str | None = opt(None, "activation store: a folder, or an fsspec URL to read (default: one per "
                                  "model/corpus/sites under the cache dir)")
    out: Path = opt(Path("runs/sae"), "output folder")
    batch_size: int = opt(0, "tokens per step; 0 = chosen from --tokens (the short-budget rule, see the README)")
    lr: float = opt(0.0, "Adam learning rate; 0 = chosen from --tokens and --latents, lowered where massive activations "
                                 "dominate the training rows, and there (TopK, BatchTopK) that rate and twice it (at most the "
                                 "plain rule's) trained in lockstep, the better on training rows kept (the short-budget rule)")
    warmup_steps: int = opt(-1, "linear learning-rate warm-up, in steps; -1 = chosen from the number of steps")
    decay_fraction: float = opt(0.2, "fraction of steps at the end with linear decay to 0")
    auxk_coefficient: float = opt(1 / 32, "weight of the AuxK loss (topk / batchtopk)")
    auxk_dead_tokens: int = opt(0, "tokens without firing after which AuxK treats a latent as dead; 0 = min(10M, tokens/8)", parse=parse_count)
    dead_window: int = opt(10_000_000, "a latent is dead if it did not fire in this many final tokens (or the whole run)", parse=parse_count)
    drop_outliers: float = opt(0.0, "leave out training rows whose input norm exceeds this many times the median "
                                    "(e.g. 10, for massive activations); 0 keeps every row")
    normalize_input: bool = opt(True, "scale inputs to E||x||^2 = d (folded into the weights on export)")
    b_dec_init: str = opt("mean", "b_dec initialisation: mean, median (geometric) or zero")
    compute_dtype: str = opt("auto", "encoder matmul dtype: auto (bfloat16 where the CPU has it natively), float32, bfloat16")
    eval_tokens: int = opt(65_536, "held-out store rows for the reconstruction metrics", parse=parse_count)
    eval_contexts: int = opt(32, "held-out contexts for the spliced-CE metrics (0 to skip)")
    checkpoint_every: int = opt(100, "steps between checkpoints")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    seed: int = opt(0, "seed for initialisation and data order")
    context_len: int = opt(128, "context length when harvesting")
    l1_coefficient: float = opt(1e-3, "relu: L1 weight")
    l0_coefficient: float = opt(1e-3, "jumprelu: L0 weight")
    device: str = opt("cpu", "device")
    parallel: str = opt("auto", "under torchrun: data (each rank takes a slice of every batch, gradients summed), "
                                "dictionaries (each rank trains some dictionaries of the sweep on all the data), "
                                "auto (dictionaries when the sweep splits evenly over the ranks, else data)")

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens)
        self.eval_tokens = parse_count(self.eval_tokens)
        self.auxk_dead_tokens = parse_count(self.auxk_dead_tokens)
        self.dead_window = parse_count(self.dead_window)
        self.out = Path(self.out)
        self.store = str(self.store) if self.store else None

    def ks(self) -> list[int]:
        try:
            values = [int(v) for v in str(self.k).split(",") if v.strip()]
        except ValueError:
            raise InputError(f"k={self.k!r}: give an integer or a comma-separated list of integers") from None
        if not values:
            raise InputError("k is empty")
        return values


@dataclass
class TranscoderTrainConfig(TrainConfig):
    """The same job with transcoder defaults: the MLP's input (ln2 output) -> the MLP's output."""

    site: str = opt("ln2", "input site: short kind or full name")
    output_site: str = opt("mlp_out", "output site: short kind or full name")
    out: Path = opt(Path("runs/transcoder"), "output folder")


def resolve_site(model: Any, site: str, layer: int) -> str:
    """A full site name from a short kind (``resid_post`` + layer) or a full name."""
    return model.site_table.check(site) if "." in site or site in model.site_table else model.site(site, layer)


def default_store(config: TrainConfig, sites: list[str], model_name: str) -> Path:
    tag = "+".join(s.replace("blocks.", "L").replace(".hook_", ".").replace("hook_", "") for s in sites)
    return interp_home() / "stores" / f"{model_name}-{config.corpus.replace('/', '_')}-{tag}-{config.tokens + config.eval_tokens}-ctx{config.context_len}"


AUXK_DENSE_LATENTS = 1024  # padded dead latents up to which AuxK runs dense (see auxk_reconstruction)
TRIM_EVERY = 50  # steps between returns of free heap memory (a trim after every step slowed training; every 50 does not)


class Trainer:
    """The state of one run: dictionaries, optimizers, counters, the data position."""

    def __init__(self, config: TrainConfig, *, model: Any = None, progress: bool = True):
        from interp.models import load_model

        self.config = c = config
        self.ranks = distributed.ranks(c.device)
        self.parallel = parallel_mode(c.parallel, len(c.ks()), self.ranks.world_size)
        self.progress = progress and self.ranks.is_main
        if model is None and c.model == "none":  # activations from elsewhere: sites are store names
            if c.store is None:
                raise InputError("--model none needs an existing --store")
            self.model, self.in_site, self.out_site = None, c.site, c.output_site or c.site
        else:
            self.model = model if model is not None else load_model(c.model, device=self.ranks.device(c.device))
            return_free_memory()  # a first load converts the embedded model, leaving freed heap behind
            self.in_site = resolve_site(self.model, c.site, c.layer)
            self.out_site = resolve_site(self.model, c.output_site, c.layer) if c.output_site else self.in_site
        self.sites = [self.in_site] if self.out_site == self.in_site else [self.in_site, self.out_site]
        # the schedule first: bad settings are refused before a harvest starts
        self.schedule = self._resolve_schedule(massive=False)
        self.store = self._open_store()
        self.batch_size, self.lr = self.schedule.batch_size, self.schedule.lr
        n = self.store.n_rows
        self.train_rows = (0, n - c.eval_tokens)
        if self.train_rows[1] < self.batch_size:
            raise InputError(f"the store has {n:,} rows: too few for {c.eval_tokens:,} held-out rows plus one batch of {self.batch_size}")
        self.steps = self.schedule.steps  # more tokens than training rows: further epochs
        self.auxk_dead = c.auxk_dead_tokens or min(10_000_000, max(c.tokens // 8, self.batch_size))
        sample = self._init_sample()
        self.max_norm = self._max_norm(sample)
        # the rule's rate depends on the target's rows; not tested where the rate is given or --drop-outliers
        # leaves the large rows out (a transcoder drops by its input's norm: give --lr if its target has massive rows);
        # rank 0 reads the rows and tells the others
        if not c.lr and not c.drop_outliers and self.ranks.on_main(
                lambda: training_massive_share(self.store, self.out_site, self.train_rows[1], c.seed)) >= MASSIVE_SHARE:
            self.schedule = self._resolve_schedule(massive=True)
            self.lr = self.schedule.lr
        names = [self._name(k) for k in c.ks()]
        if len(set(names)) != len(names):
            raise InputError(f"k={c.k!r} names the same dictionary twice; give each k once")
        # dictionary-parallel: rank r owns dictionaries r, r + N, ...; data-parallel: every rank all of them
        owned = c.ks()[self.ranks.rank::self.ranks.world_size] if self.parallel == "dictionaries" else c.ks()
        self.all_names = names
        # one dictionary per k and candidate rate (two where the rule cannot tell which suits the layer:
        # same initialisation, same batches; the better is kept when training ends)
        rates = self.schedule.lr_candidates
        self.candidates = {(self._name(k) if len(rates) == 1 else f"{self._name(k)}-lr{j}"): (self._name(k), rate, k)
                           for k in owned for j, rate in enumerate(rates)}
        self.dictionaries = {key: self._new_dictionary(k, sample) for key, (_, _, k) in self.candidates.items()}
        params = {key: list(d.parameters()) for key, d in self.dictionaries.items()}
        self.optimizers = {key: torch.optim.Adam(p, lr=self.candidates[key][1], fused=True) for key, p in params.items()}
        self.since_fired = {name: torch.zeros(c.latents, dtype=torch.long) for name in self.dictionaries}
        # data-parallel: every rank reads its own part of each global batch (the batch size is global)
        data = self.ranks if self.parallel == "data" else distributed.SINGLE
        self.reduce = BatchReduce(data)
        self.loader = self.store.batches(self.sites, self.batch_size, shuffle=True, seed=c.seed, rows=self.train_rows,
                                         drop_last=True, rank=data.rank, world_size=data.world_size, split="rows")
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------ set-up
    def _resolve_schedule(self, *, massive: bool) -> Schedule:
        c = self.config
        return resolve_schedule(c.tokens, c.latents, massive=massive, batch_size=c.batch_size, lr=c.lr, warmup_steps=c.warmup_steps,
                                two_rates=c.architecture in ("topk", "batchtopk"))

    def _name(self, k: int) -> str:
        c = self.config
        kind = "transcoder" if self.out_site != self.in_site else "sae"
        return f"{kind}-{c.architecture}-k{k}-{c.latents}" if c.architecture in ("topk", "batchtopk") else f"{kind}-{c.architecture}-{c.latents}"

    def _open_store(self) -> ActivationStore:
        c = self.config
        if self.model is None:
            store = ActivationStore(c.store, keep_pages=False)
            for site in self.sites:
                store.check_site(site)
            return store
        path = Path(c.store) if c.store else default_store(c, self.sites, self.model.cfg.name)
        if self.ranks.on_main(lambda: not (path / "manifest.json").exists() or not ActivationStore(path).complete):
            harvest(HarvestConfig(out=path, model=c.model, sites=",".join(self.sites), corpus=c.corpus,
                                  tokens=c.tokens + c.eval_tokens, context_len=c.context_len, device=c.device),
                    model=self.model, progress=self.progress)
        store = ActivationStore(path, keep_pages=False)  # resident memory: one batch, not the store
        for site in self.sites:
            store.check_site(site)
        if store.manifest["model"]["name"] != self.model.cfg.name:
            raise InputError(f"{path} was harvested from {store.manifest['model']['name']}, not {self.model.cfg.name}")
        return store

    def _new_dictionary(self, k: int, sample: dict[str, torch.Tensor]) -> SparseDictionary:
        c = self.config
        dc = DictionaryConfig(
            d_in=self.store.d(self.in_site), d_out=self.store.d(self.out_site), n_latents=c.latents,
            architecture=c.architecture, k=k, input_site=self.in_site,
            output_site="" if self.out_site == self.in_site else self.out_site,
            model=c.model if self.model is not None else self.store.manifest["model"]["name"],  # a spec load_model takes
            l1_coefficient=c.l1_coefficient, l0_coefficient=c.l0_coefficient,
        )
        d = SparseDictionary(dc, seed=c.seed)
        d.compute_dtype = compute_dtype(c.compute_dtype)
        self._initialise(d, sample)
        return d

    def _init_sample(self) -> dict[str, torch.Tensor]:
        """A fixed sample of training rows (checked for NaN/inf)."""
        sample_rows = init_sample_rows(self.train_rows[1], self.config.seed)
        batch = {site: self.store.read(site, sample_rows) for site in self.sites}
        _check_finite(batch, sample_rows, self.store)
        return batch

    def _max_norm(self, sample: dict[str, torch.Tensor]) -> float:
        """The input norm above which ``--drop-outliers`` leaves a row out (inf: keep all)."""
        factor = self.config.drop_outliers
        if factor < 0:
            raise InputError(f"drop_outliers={factor}: give a factor of the median norm (e.g. 10), or 0 to keep every row")
        if not factor:
            return math.inf
        return factor * float(sample[self.in_site].norm(dim=-1).median())

    def _keep(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows of ``batch`` within ``max_norm``."""
        if self.max_norm == math.inf:
            return batch
        keep = batch[self.in_site].norm(dim=-1) <= self.max_norm
        return {site: t[keep] for site, t in batch.items()}

    @torch.no_grad()
    def _initialise(self, d: SparseDictionary, sample: dict[str, torch.Tensor]) -> None:
        """Input scales and b_dec from a fixed sample of training rows."""
        c = self.config
        batch = self._keep(sample)
        x, y = batch[self.in_site], batch[self.out_site]
        if c.normalize_input:
            d.input_scale.fill_(math.sqrt(x.shape[1] / float(x.pow(2).sum(-1).mean())))
            d.output_scale.fill_(float(d.input_scale) if y is x else math.sqrt(y.shape[1] / float(y.pow(2).sum(-1).mean())))
        target = y * d.output_scale
        if c.b_dec_init == "mean":
            d.b_dec.copy_(target.mean(0))
        elif c.b_dec_init == "median":
            d.b_dec.copy_(geometric_median(target))
        elif c.b_dec_init != "zero":
            raise InputError(f"b_dec_init={c.b_dec_init!r}: choose mean, median or zero")

    # ------------------------------------------------------------ training
    def lr_at(self, step: int, rate: float | None = None) -> float:
        """The learning rate at ``step`` for a dictionary trained at ``rate`` (default: the schedule's)."""
        c = self.config
        warm = min(1.0, (step + 1) / max(1, self.schedule.warmup_steps))
        decay_start = int(self.steps * (1 - c.decay_fraction))
        decay = 1.0 if step < decay_start else max(0.0, (self.steps - step) / max(1, self.steps - decay_start))
        return (rate or self.lr) * warm * decay

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        batch = self._keep(batch)
        x, y = batch[self.in_site], batch[self.out_site]
        stats = {key: step_dictionary(d, self.optimizers[key], x, y, self.since_fired[key], lr=self.lr_at(self.step, self.candidates[key][1]),
                                      auxk_dead=self.auxk_dead, auxk_coefficient=self.config.auxk_coefficient, reduce=self.reduce)
                 for key, d in self.dictionaries.items()}
        self.step += 1
        return stats

    def run(self) -> dict[str, dict[str, Any]]:
        c = self.config
        c.out.mkdir(parents=True, exist_ok=True)
        if self.ranks.is_main:
            resolved = {**self.schedule.as_dict(), "parallel": self.parallel, "world_size": self.ranks.world_size}
            write_json(c.out / "config.json", {**config_dict(c), "resolved": resolved}, indent=2)
        if self.progress:
            tqdm.write(f"schedule: {self.schedule.describe()}")
        bar = tqdm(total=self.steps * self.batch_size, initial=self.step * self.batch_size, unit="tok", unit_scale=True,
                   desc="train", disable=not self.progress, smoothing=0.1)
        batches = self._batches()
        return_free_memory()  # what start-up freed (the massive-activation test reads 131,072 rows)
        start = time.perf_counter()
        while self.step < self.steps:
            rows, batch = next(batches)
            self._check_batch(batch, rows)
            stats = self.train_step(batch)
            fault_point("train.step")
            first = next(iter(stats.values()))
            bar.update(self.batch_size)
            if self.step % 10 == 0 or self.step == self.steps:
                bar.set_postfix_str(f"loss {first['loss']:.3f} fvu {first['fvu']:.3f} L0 {first['l0']:.1f} "
                                    f"dead {self.dead_fraction(next(iter(stats))):.1%}")
                self.history.append({"step": self.step, "tokens": self.step * self.batch_size, **{n: s for n, s in stats.items()}})
            if self.step % c.checkpoint_every == 0 or self.step == self.steps:
                self.save_checkpoint()
            if self.step % TRIM_EVERY == 0:
                return_free_memory()
        bar.close()
        self.train_seconds = time.perf_counter() - start
        return self.finish()

    def _check_batch(self, batch: dict[str, torch.Tensor], rows: Any) -> None:
        """Stop on NaN/inf; in data-parallel runs every rank stops (the one holding the row names it)."""
        try:
            _check_finite(batch, rows, self.store)
            error = None
        except InputError as err:
            error = err
        bad = self.reduce.ranks.all_reduce(torch.tensor([float(error is not None)]), "max")
        if error is not None:
            raise error
        if bool(bad > 0):
            raise InputError("another rank found a non-finite activation in this step's batch (its message names the "
                             "store row); training stopped, the last checkpoint is unchanged")

    def _batches(self):
        """(store rows, batch) pairs, epoch after epoch."""
        while True:
            for batch in self.loader:
                yield self.loader.rows_of(self.loader.batch - 1), batch

    def dead_fraction(self, name: str) -> float:
        window = min(self.config.dead_window, self.step * self.batch_size)
        return float((self.since_fired[name] >= max(window, 1)).double().mean())

    # ----------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Data-parallel: rank 0 writes (every rank holds the same state); dictionary-parallel: each
        rank writes its own dictionaries' files into the version and rank 0 completes it."""
        if self.parallel == "data" and not self.ranks.is_main:
            return
        writers = self.ranks if self.parallel == "dictionaries" else distributed.SINGLE
        history = merge_histories(writers.gather(self.history))
        tensors = {}
        for name, d in self.dictionaries.items():
            tensors[name] = {f"model.{k}": v.detach().contiguous() for k, v in d.state_dict().items()}
            tensors[name].update(_optimizer_tensors(self.optimizers[name]))
            tensors[name]["since_fired"] = self.since_fired[name]
        state = {"step": self.step, "loader": self.loader.state_dict(), "history": history,
                 "config": config_dict(self.config), "d_in": self.store.d(self.in_site), "lr": self.lr,
                 "lr_candidates": self.schedule.lr_candidates,
                 "parallel": self.parallel, "world_size": self.ranks.world_size}
        checkpoint.save(self.config.out, self.step, tensors, state, ranks=writers)

    def load_checkpoint(self) -> None:
        folder, state = checkpoint.load(self.config.out)
        if state["d_in"] != self.store.d(self.in_site):
            raise InputError(f"--resume: the checkpoint has d_in={state['d_in']}, the site has {self.store.d(self.in_site)}")
        # how the work is spread over ranks changes nothing but float rounding: not compared
        saved = {k: v for k, v in state["config"].items() if k not in ("resume", "parallel")}
        now = {k: v for k, v in config_dict(self.config).items() if k not in ("resume", "parallel")}
        differ = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if differ:
            raise InputError(f"--resume: the settings differ from the checkpoint's: {differ}")
        saved, now = state.get("lr_candidates", [state.get("lr", self.lr)]), self.schedule.lr_candidates
        if len(saved) != len(now) or any(abs(a - b) > 1e-9 * a for a, b in zip(saved, now)):  # another interp version's rule
            raise InputError(f"--resume: the checkpoint trained at lr {' and '.join(f'{r:.4g}' for r in saved)}, this version's "
                             f"schedule rule gives {' and '.join(f'{r:.4g}' for r in now)}: continue it with the interp version "
                             "that started it, or start a new run in another --out")
        for name, d in self.dictionaries.items():
            tensors = checkpoint.load_tensors(folder, name)
            d.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            _load_optimizer_tensors(self.optimizers[name], tensors)
            self.since_fired[name] = tensors["since_fired"].clone()
        self.loader.load_state_dict(state["loader"])
        self.step, self.history = state["step"], state["history"]

    # ------------------------------------------------------------ results
    def finish(self) -> dict[str, dict[str, Any]]:
        """Evaluate and save the dictionaries this rank owns (data-parallel: rank 0 all of them);
        rank 0 writes the run's metrics.json and history.json; every rank returns all metrics."""
        c = self.config
        evaluating = self.parallel == "dictionaries" or self.ranks.is_main
        results = self._evaluate() if evaluating else {}
        history = self.history
        if self.parallel == "dictionaries":
            history = merge_histories(self.ranks.gather(self.history))
            gathered = {name: m for part in self.ranks.gather(results) for name, m in part.items()}
            results = {name: gathered[name] for name in self.all_names}
        else:
            results = self.ranks.broadcast(results)
        if self.ranks.is_main:
            write_json(c.out / "metrics.json", results)
            write_json(c.out / "history.json", history, indent=None)
        return results

    def _evaluate(self) -> dict[str, dict[str, Any]]:
        c = self.config
        results = {}
        held_out = (self.train_rows[1], self.store.n_rows)
        contexts = None if self.model is None else held_out_contexts(self.store, held_out, c.eval_contexts, self.model.tokenizer)
        if c.architecture == "batchtopk":  # the inference threshold, from the final weights on training rows
            sample = self._keep(self._init_sample())[self.in_site]
            for d in self.dictionaries.values():
                d.calibrate_threshold(sample)
        for name, (key, selection) in self._select().items():
            d, rate = self.dictionaries[key], self.candidates[key][1]
            metrics = {"tokens": self.step * self.batch_size, "train_seconds": self.train_seconds, "lr": rate,
                       **({"lr_selection": selection} if selection else {}),
                       "dead_fraction": self.dead_fraction(key), **dictionary_metrics(d, self.store, held_out, self.model, contexts)}
            folder = c.out / name
            io.save_dictionary(d, folder, metrics=metrics, store=self.store.location, held_out_rows=list(held_out),
                               training={"steps": self.step, **self.schedule.as_dict(), "lr": rate})
            if not (c.architecture == "topk" and d.config.is_transcoder):
                io.export_saelens(d, folder / "saelens")
            write_json(folder / "metrics.json", metrics)
            results[name] = metrics
        return results

    def _select(self) -> dict[str, tuple[str, dict[str, float]]]:
        """Per dictionary name, the candidate kept (the lowest FVU on ``SELECTION_ROWS`` training rows,
        fixed by the seed) and every candidate's FVU there ({} where a name has one candidate)."""
        by_name: dict[str, list[str]] = {}
        for key, (name, _, _) in self.candidates.items():
            by_name.setdefault(name, []).append(key)
        if all(len(keys) == 1 for keys in by_name.values()):
            return {name: (keys[0], {}) for name, keys in by_name.items()}
        rows = init_sample_rows(self.train_rows[1], self.config.seed, SELECTION_ROWS)
        fvus = dict(zip(self.candidates, rows_fvu([self.dictionaries[key] for key in self.candidates], self.store, rows)))
        chosen = {}
        for name, keys in by_name.items():
            best = min(keys, key=fvus.__getitem__)
            chosen[name] = (best, {f"{self.candidates[key][1]:.6g}": fvus[key] for key in keys})
            if self.progress:
                tqdm.write(f"{name}: lr {self.candidates[best][1]:.3g} kept (FVU on {len(rows):,} training rows: "
                           + ", ".join(f"{self.candidates[key][1]:.3g}: {fvus[key]:.4f}" for key in keys) + ")")
        return chosen


def step_dictionary(d: SparseDictionary, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    since_fired: torch.Tensor, *, lr: float, auxk_dead: int, auxk_coefficient: float,
                    reduce: BatchReduce | None = None) -> dict[str, float]:
    """One optimisation step; ``since_fired`` (tokens since each latent last fired) is updated in place.

    With a data-parallel ``reduce``, ``x``/``y`` are this rank's part of the global batch: the loss
    is this part's share of the global batch's loss, gradients and firing counts are summed over
    the ranks, so every rank takes the step one process would take on the whole batch.
    """
    reduce = reduce or BatchReduce(distributed.SINGLE)
    d.train()
    dead = since_fired >= auxk_dead
    loss, info, fires = dictionary_loss(d, x, y, dead, auxk_coefficient, reduce)
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss became {float(loss.detach())}: training diverged (try a lower --lr); "
                            "the last checkpoint is unchanged")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    reduce.ranks.sum_gradients(d.parameters())
    d.project_decoder_grad()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    d.normalize_decoder()
    since_fired += int(reduce.rows)
    since_fired[fires > 0] = 0
    info["dead_auxk"] = float(dead.double().mean())
    return info


def dictionary_loss(d: SparseDictionary, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor, auxk_coefficient: float,
                    reduce: BatchReduce | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The training loss of one batch: FVU (+ AuxK / L1 / L0 by architecture); stats; fire counts.

    Every term is a sum over rows divided by a whole-batch quantity (rows, total variance), so with
    a data-parallel ``reduce`` each rank's loss is its share and the shares add up to the loss of
    the global batch; the stats and fire counts returned are the global batch's.
    """
    reduce = reduce or BatchReduce(distributed.SINGLE)
    c = d.config
    z = d.encoder_input(x)
    code = d.encode_scaled(z, batch=True, reduce=reduce.ranks)
    target = y.to(d.W_dec.dtype) * d.output_scale
    error = target - d.decode_scaled(code)
    rows, total_var = reduce.totals(target)
    fvu = error.pow(2).sum() / total_var
    loss = fvu
    parts = {"fvu": fvu.detach(), "l0": code.l0().double().sum() / rows}  # in one process: bit for bit .mean()
    if c.architecture in ("topk", "batchtopk") and bool(dead.any()):
        dead_ids = dead.nonzero().squeeze(1)
        k_aux = min(c.d_in // 2, dead_ids.numel())
        scale = min(dead_ids.numel() / (c.d_in // 2), 1.0)
        reconstruction = auxk_reconstruction(d, z, dead_ids, k_aux)
        auxk = scale * (reconstruction - error.detach()).pow(2).sum() / total_var
        loss = loss + auxk_coefficient * auxk
        parts["auxk"] = auxk.detach()
    elif c.architecture == "relu":
        l1 = code.dense.sum(-1).sum() / rows
        loss = loss + c.l1_coefficient * l1
        parts["l1"] = l1.detach()
    elif c.architecture == "jumprelu":
        loss = loss + c.l0_coefficient * jumprelu_l0(d, z, rows=rows)
    parts["loss"] = loss.detach()
    info = reduce.sum_stats(parts)
    return loss, info, reduce.ranks.all_reduce(code.fire_counts(c.n_latents))


def auxk_reconstruction(d: SparseDictionary, z: torch.Tensor, dead_ids: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK's reconstruction: per row, the ``k_aux`` largest ReLU pre-activations among the latents
    ``dead_ids``, decoded.

    The dead set is padded to a power of two (at least 64) with latents that never fire (weights 0,
    bias -inf): its size changes every step, and each new bfloat16 matmul shape makes oneDNN build a
    kernel and keep it for the rest of the run, so resident memory grew step after step (the
    training phase of ``experiments/bench/memory_phases.py``). Up to ``AUXK_DENSE_LATENTS`` padded
    latents the selection and the decoding run as dense matmuls, faster there than the sparse
    kernels at k_aux = d_in / 2 (``experiments/bench/bench_auxk.py``); above it, the sparse kernels.
    """
    n = dead_ids.numel()
    size = min(d.config.n_latents, 1 << max(6, (n - 1).bit_length()))
    W_enc = F.pad(d.W_enc[dead_ids], (0, 0, 0, size - n))
    b_enc = F.pad(d.b_enc[dead_ids], (0, size - n), value=-math.inf)
    W_dec = F.pad(d.W_dec[dead_ids], (0, 0, 0, size - n))
    if size > AUXK_DENSE_LATENTS:
        values, local = K.topk_encode(z, W_enc, b_enc, k_aux, compute_dtype=d.compute_dtype)
        return K.sparse_decode(values, local, W_dec)
    dtype = d.compute_dtype or z.dtype
    pre = torch.addmm(b_enc.to(dtype), z.to(dtype), W_enc.to(dtype).T).float()
    values, chosen = pre.topk(k_aux, dim=1)
    code = torch.zeros_like(pre).scatter(1, chosen, values.relu())
    return code @ W_dec  # float32: decoding in bfloat16 loses too much of the sum


def dictionary_metrics(d: SparseDictionary, store: ActivationStore, rows: tuple[int, int], model: Any,
                       contexts: torch.Tensor | None) -> dict[str, Any]:
    """Reconstruction metrics on store ``rows``, plus the spliced-CE metrics on ``contexts`` if any."""
    metrics = reconstruction_metrics(d, store, rows)
    if contexts is not None:
        first = 1 if store.manifest["exclude_bos"] else 0  # splice where the store has rows
        metrics.update(splice_metrics(model, d, contexts, first_position=first))
    return metrics


def held_out_contexts(store: ActivationStore, rows: tuple[int, int], count: int, tokenizer: Any) -> torch.Tensor | None:
    """Token ids of up to ``count`` whole contexts whose rows all lie in the held-out range."""
    if count <= 0:
        return None
    table = store.rows(slice(*rows))
    per_context = store.manifest["rows_per_context"]
    ids, counts = np.unique(table[:, 0], return_counts=True)
    whole = ids[counts == per_context][:count]
    if not len(whole):
        return None
    out = []
    for context in whole:
        mine = table[table[:, 0] == context]
        tokens = mine[np.argsort(mine[:, 1]), 2]
        if store.manifest["exclude_bos"]:
            tokens = np.concatenate([[tokenizer.bos_token_id], tokens])
        out.append(tokens)
    return torch.from_numpy(np.stack(out)).long()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError, TypeError):  # other C libraries; Windows (CDLL(None) is a TypeError)
        return None


def return_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc; elsewhere nothing). Freed tensor buffers
    otherwise stay resident, and resident memory grows over training (README, "Memory of the main job")."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def init_sample_rows(n_train: int, seed: int, size: int = 16_384) -> np.ndarray:
    """The training rows (sorted) that set the input scales and b_dec (``size`` of them)."""
    return np.sort(np.random.default_rng(seed).choice(n_train, min(size, n_train), replace=False))


def training_massive_share(store: ActivationStore, site: str, n_train: int, seed: int) -> float:
    """The share of the variance of ``site`` held by massive rows, over ``MASSIVE_SAMPLE_ROWS`` of the
    first ``n_train`` rows: at SmolLM2's layer 12 the initialisation sample holds about 4 of them, at
    some seeds none of the largest."""
    return massive_share_in(lambda rows: store.read(site, rows), init_sample_rows(n_train, seed, MASSIVE_SAMPLE_ROWS))


def geometric_median(points: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def compute_dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if K.native_bfloat16() else None
    if name in ("float32", "bfloat16"):
        return None if name == "float32" else torch.bfloat16
    raise InputError(f"compute_dtype={name!r}: choose auto, float32 or bfloat16")


def _check_finite(batch: dict[str, torch.Tensor], rows: Any, store: ActivationStore) -> None:
    for site, values in batch.items():
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).any(-1).nonzero()[0])
            row = int(np.asarray(rows)[bad]) if not isinstance(rows, slice) else rows.start + bad
            context, position = store.rows(np.array([row]))[0, :2]
            raise InputError(
                f"non-finite activation at {site}, store row {row} (context {context}, position {position}); "
                "training stopped, the last checkpoint is unchanged"
            )


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    return out


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            restored.setdefault(int(index), {})[name] = value
    state["state"] = restored
    optimizer.load_state_dict(state)


def train(config: TrainConfig, *, model: Any = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run (or resume) a training job; returns the metrics of every dictionary.

    The run folder is locked for the whole job: a second job with the same ``--out`` exits at once,
    naming the pid that holds it. Under ``torchrun`` every rank calls this (``interp train-sae``
    does): rank 0 holds the lock, and every rank returns the metrics of every dictionary.
    """
    ranks = distributed.ranks(config.device)
    with contextlib.ExitStack() as held:
        def claim() -> None:
            held.enter_context(file_lock(config.out / RUN_LOCK, what=f"the run folder {config.out}", wait=False))
            if not config.resume and checkpoint.exists(config.out):
                raise InputError(f"{config.out} already holds a run; pass --resume to continue it or choose another --out")

        ranks.on_main(claim)
        trainer = Trainer(config, model=model, progress=progress)
        if config.resume:
            trainer.load_checkpoint()
        return trainer.run()


RUN_LOCK = "run.lock"


@dataclass
class EvalConfig:
    dictionary: Path = opt(help="a trained dictionary folder (e.g. runs/sae/sae-topk-k32-8192)", argument=True)
    store: str | None = opt(None, "store to evaluate on, a folder or an fsspec URL (default: the training store, its held-out rows)")
    eval_contexts: int = opt(32, "held-out contexts for the spliced-CE metrics (0 to skip)")


def evaluate(config: EvalConfig, *, model: Any = None) -> dict[str, Any]:
    """Recompute the metrics of a saved dictionary on its held-out rows (or all rows of another store)."""
    from interp.models import load_model

    meta = io.read_meta(config.dictionary)
    store = ActivationStore(config.store or meta["store"], keep_pages=False)
    rows = tuple(meta["held_out_rows"]) if config.store is None else (0, store.n_rows)
    input_site = meta["config"]["input_site"]
    for site in {input_site, meta["config"]["output_site"] or input_site}:
        store.check_site(site)
    d = io.load_dictionary(config.dictionary, d_in=store.d(input_site))
    contexts = None
    if config.eval_contexts > 0:  # the spliced-CE metrics need the model
        model = model if model is not None else load_model(d.config.model or store.manifest["model"]["name"])
        contexts = held_out_contexts(store, rows, config.eval_contexts, model.tokenizer)
    metrics = dictionary_metrics(d, store, rows, model, contexts)
    write_json(Path(config.dictionary) / "eval.json", metrics)
    return metrics


__all__ = ["EvalConfig", "TrainConfig", "Trainer", "TranscoderTrainConfig", "dictionary_loss", "evaluate", "metrics_table",
           "step_dictionary", "train"]
