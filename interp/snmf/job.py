"""``interp snmf``: factorise one layer's MLP activations, evaluate on held-out tokens, report features.

1. checks the settings, the site (it must be ``blocks.L.mlp.hook_post``) and the store before any
   fitting; harvests the store when none exists (the first ``tokens`` rows are fitted, the last
   ``eval_tokens`` rows held out);
2. fits SNMF (recursively for ``--k 400,100,25``), with Y in ``OUT/level0-kK/`` so that a killed
   fit continues with ``--resume``;
3. writes each level (``snmf.safetensors``, ``snmf.json``, ``Y.npy``), ``metrics.json`` (training
   and held-out error per level), ``features.html`` / ``features.json`` for the strongest features,
   and prints the feature table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from interp.config import opt, parse_count, write_config
from interp.errors import InputError
from interp.paths import atomic_write, interp_home, write_json
from interp.snmf.core import STATE, SNMFConfig, check_finite
from interp.snmf.data import StoreActivations
from interp.snmf.factors import SNMF, evaluate, fit_recursive, hierarchy_table
from interp.snmf.report import feature_reports, feature_table, reports_json, write_feature_page


@dataclass
class SNMFJobConfig:
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    layer: int = opt(12, "layer whose MLP activations are factorised")
    site: str = opt("mlp_post", "site: the MLP hidden activation, mlp_post or blocks.L.mlp.hook_post")
    k: str = opt("100", "features; a decreasing comma-separated list (e.g. 400,100,25) fits recursive SNMF")
    sparsity: float = opt(0.01, "fraction of the MLP's neurons each feature keeps (winner-take-all)")
    init: str = opt("kmeans", "initialisation: kmeans, random or svd")
    tokens: int = opt(200_000, "tokens to factorise (e.g. 200k)", parse=parse_count)
    eval_tokens: int = opt(32_768, "held-out store rows for the held-out reconstruction error", parse=parse_count)
    store: Path | None = opt(None, "activation store (default: one per model/corpus/site under the cache dir, harvested if missing)")
    corpus: str = opt("shakespeare", "corpus to harvest from when the store does not exist yet")
    context_len: int = opt(128, "context length when harvesting")
    out: Path = opt(Path("runs/snmf"), "output folder")
    max_iter: int = opt(300, "most iterations")
    patience: int = opt(20, "stop after this many iterations without a relative improvement of --tol")
    tol: float = opt(1e-4, "relative improvement of the best error that resets the patience count")
    ridge: float = opt(1e-6, "ridge of the least-squares update of Z, relative to the mean diagonal of YᵀY")
    seed: int = opt(0, "seed of the initialisation")
    chunk_size: int = opt(16_384, "tokens per chunk (memory use grows with it, not with --tokens)")
    device: str = opt("cpu", "device")
    report: int = opt(10, "features in the printed table and in features.html (the strongest by ‖z‖)")
    examples: int = opt(8, "top contexts per reported feature")
    resume: bool = opt(False, "continue an interrupted fit in --out")

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens)
        self.eval_tokens = parse_count(self.eval_tokens)
        self.out = Path(self.out)
        self.store = Path(self.store) if self.store else None

    def ks(self) -> list[int]:
        try:
            values = [int(v) for v in str(self.k).split(",") if v.strip()]
        except ValueError:
            raise InputError(f"k={self.k!r}: give an integer or a decreasing comma-separated list (400,100,25)") from None
        if not values:
            raise InputError("k is empty")
        return values

    def fit_config(self, k: int) -> SNMFConfig:
        return SNMFConfig(k=k, sparsity=self.sparsity, init=self.init, max_iter=self.max_iter, patience=self.patience,
                          tol=self.tol, ridge=self.ridge, seed=self.seed, chunk_size=self.chunk_size, device=self.device)


def mlp_site(model: Any, site: str, layer: int) -> str:
    """The full name of an MLP hidden site; anything else is refused with the valid choice."""
    from interp.dictionary.train import resolve_site

    name = resolve_site(model, site, layer)
    if model.site_table.info(name).kind != "mlp_post":
        raise InputError(f"SNMF factorises MLP hidden activations; {name} is not one. Use --site mlp_post "
                         f"(= {model.site('mlp_post', layer)}), the input of the MLP's down projection")
    return name


def _level_folder(out: Path, level: int, k: int) -> Path:
    return out / f"level{level}-k{k}"


def run_snmf(config: SNMFJobConfig, *, model: Any = None, progress: bool = True) -> dict[str, Any]:
    """Run the job (see the module docstring); returns the metrics written to ``metrics.json``."""
    from interp.models import load_model
    from interp.store import ActivationStore, HarvestConfig, harvest

    ks = config.ks()
    config.fit_config(ks[0]).check(config.tokens, 1)  # k vs tokens, init, sparsity: before any work
    if any(b >= a for a, b in zip(ks, ks[1:], strict=False)):
        raise InputError(f"--k {config.k}: recursive SNMF needs decreasing sizes, e.g. 400,100,25")
    if config.eval_tokens < 0 or config.report < 0:
        raise InputError("--eval-tokens and --report must be non-negative")
    finished = _level_folder(config.out, 0, ks[0]) / "snmf.json"
    if finished.exists() and not config.resume:
        raise InputError(f"{config.out} already holds a fit; pass --resume to reuse it or choose another --out")
    if (_level_folder(config.out, 0, ks[0]) / STATE).exists() and not config.resume:
        raise InputError(f"{config.out} holds an interrupted fit; pass --resume to continue it or choose another --out")
    model = model if model is not None else load_model(config.model, device=config.device)
    site = mlp_site(model, config.site, config.layer)
    path = config.store or interp_home() / "stores" / (
        f"{model.cfg.name}-{config.corpus.replace('/', '_')}-L{config.layer}.mlp_post-"
        f"{config.tokens + config.eval_tokens}-ctx{config.context_len}")
    if not (path / "manifest.json").exists() or (config.store is None and not ActivationStore(path).complete):
        if config.store is not None:
            raise InputError(f"{path} is not an activation store; leave out --store to harvest one")
        harvest(HarvestConfig(out=path, model=config.model, sites=site, corpus=config.corpus,
                              tokens=config.tokens + config.eval_tokens, context_len=config.context_len,
                              device=config.device), model=model, progress=progress)
    store = ActivationStore(path)
    store.check_site(site)
    if store.n_rows < config.tokens + config.eval_tokens:
        raise InputError(f"{path} has {store.n_rows:,} rows; --tokens {config.tokens:,} plus --eval-tokens "
                         f"{config.eval_tokens:,} need {config.tokens + config.eval_tokens:,}")
    if store.d(site) != model.cfg.d_mlp:
        raise InputError(f"{path} holds {site} with width {store.d(site)}, but {model.cfg.name} has d_mlp {model.cfg.d_mlp}")

    source = StoreActivations(store, site, (0, config.tokens), cache=None)
    check_finite(source, config.chunk_size, config.device)  # NaN/inf: refused before anything is written
    write_config(config, config.out)
    if finished.exists():
        levels = _load_levels(config.out, ks)
    else:
        levels = fit_recursive(source, ks, config.fit_config(ks[0]), workdir=config.out, resume=config.resume,
                               progress=progress)
        for i, level in enumerate(levels):
            level.save(_level_folder(config.out, i, level.k))
    held_out = StoreActivations(store, site, (store.n_rows - config.eval_tokens, store.n_rows)) if config.eval_tokens else None
    metrics: dict[str, Any] = {"site": site, "store": str(path), "tokens": config.tokens, "levels": []}
    for i, level in enumerate(levels):
        entry = {"level": i, "k": level.k, "iterations": level.info["iterations"],
                 "best_iteration": level.info["best_iteration"], "seconds": round(level.info["seconds"], 1),
                 "train_relative_error": level.info["relative_error"] if i == 0 else None,
                 "train_fvu": level.info["fvu"] if i == 0 else None,
                 "dead_features": level.info["dead_features"]}
        if i > 0:
            entry["features_relative_error"] = level.info["relative_error"]  # of the previous level's Z
        if held_out is not None:
            scores = evaluate(level, held_out, device=config.device)
            entry.update(heldout_relative_error=scores["relative_error"], heldout_fvu=scores["fvu"])
        metrics["levels"].append(entry)
    write_json(config.out / "metrics.json", metrics)
    print(pd.DataFrame(metrics["levels"]).to_string(index=False))

    for i, level in enumerate(levels if config.report else []):
        suffix = "" if i == 0 else f"-level{i}"
        reports = feature_reports(level, store, model, list(range(min(config.report, level.k))), n_examples=config.examples)
        with pd.option_context("display.width", 200, "display.max_colwidth", 90):
            print(f"\nlevel {i} (k={level.k}), strongest features:\n" + feature_table(reports).to_string(index=False))
        page = write_feature_page(reports, config.out / f"features{suffix}.html", f"SNMF of {site}, level {i}, k={level.k}")
        write_json(config.out / f"features{suffix}.json", reports_json(reports))
        print(f"wrote {page}")
    if len(levels) > 1:
        tree = hierarchy_table(levels)
        atomic_write(config.out / "hierarchy.csv", lambda tmp: tree.to_csv(tmp, index=False))
        print(f"wrote {config.out / 'hierarchy.csv'} (each feature's parent one level up)")
    print(f"wrote {config.out}/metrics.json and one folder per level ({', '.join(p.name for p in _folders(config.out, levels))})")
    return metrics


def _folders(out: Path, levels: list[SNMF]) -> list[Path]:
    return [_level_folder(out, i, level.k) for i, level in enumerate(levels)]


def _load_levels(out: Path, ks: list[int]) -> list[SNMF]:
    levels = []
    for i, k in enumerate(ks):
        folder = _level_folder(out, i, k)
        if not (folder / "snmf.json").exists():
            raise InputError(f"{out} holds a fit with other --k levels than {ks}; choose another --out")
        levels.append(SNMF.load(folder))
    return levels
