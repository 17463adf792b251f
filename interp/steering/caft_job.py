"""The ``interp caft`` job: plain fine-tuning, CAFT and random-direction CAFT on a two-cue task, over seeds.

Per seed: plain LoRA fine-tuning; CAFT directions (PCA of the plain-minus-base activation
differences, kept where they separate the spurious concept's texts; or SAE latents; or a file);
CAFT with them; CAFT with as many random directions. Each run starts from the base weights and
is scored on the in-distribution and out-of-distribution test sets. Rows go to
``OUT/results.jsonl`` as they finish, and a run again skips the (seed, condition) rows there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from tqdm.auto import tqdm

from interp.config import config_dict, opt, write_config
from interp.data.concepts import load_concept
from interp.errors import InputError
from interp.steering.caft import (
    Directions, FinetuneConfig, accuracy, check_directions, finetune, interpret_components, load_directions, load_task,
    pca_directions, random_directions, sae_directions, save_directions, save_model, select,
)

if TYPE_CHECKING:
    from interp.models.model import Model

CONDITIONS = ("plain", "caft", "random")


@dataclass
class CaftConfig:
    task: str = opt("sentiment_topic", "two-cue task: a built-in name or a fragment file (.json) like data/tasks/sentiment_topic.json")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    conditions: str = opt("plain,caft,random", "runs per seed: plain (fine-tuning), caft, random (CAFT with random directions)")
    seeds: str = opt("0,1,2", "comma-separated seeds (LoRA initialisation, batches, training draw)")
    directions: str = opt("pca", "pca (from the plain run of each seed), sae (--sae and --latents) or a .safetensors file (site -> [k, d])")
    layers: str = opt("4,8,12", "layers whose resid_post gets PCA directions")
    n_components: int = opt(8, "principal components computed per layer")
    top: int = opt(4, "keep this many components: those whose projection best separates the spurious concept's two classes")
    min_effect: float = opt(0.0, "and only components with at least this effect size (difference of class means / pooled sd)")
    interpret: str | None = opt(None, "labelled concept used to read the components (default: the task's spurious concept)")
    sae: Path | None = opt(None, "dictionary folder for --directions sae")
    latents: str | None = opt(None, "comma-separated SAE latents for --directions sae")
    steps: int = opt(24, "optimiser steps per run")
    batch_size: int = opt(16, "sentences per step")
    lr: float = opt(1e-3, "AdamW step size")
    rank: int = opt(8, "LoRA rank (alpha = 2 x rank)")
    n_train: int = opt(256, "training sentences (drawn per seed)")
    skip_first: bool = opt(False, "project at every position but each sentence's first (SmolLM2's attention sink)")
    save_model: bool = opt(False, "also save the CAFT model of the first seed (a HF folder, no hooks) to OUT/model-caft")
    out: Path = opt(Path("runs/caft"), "output folder: results.jsonl, summary.csv, directions-seed*.safetensors, config.json")

    def parsed(self) -> tuple[list[str], list[int]]:
        conditions = [c.strip() for c in self.conditions.split(",") if c.strip()]
        if not conditions or any(c not in CONDITIONS for c in conditions):
            raise InputError(f"--conditions {self.conditions!r}: choose from {', '.join(CONDITIONS)}")
        try:
            seeds = [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise InputError(f"--seeds {self.seeds!r}: give comma-separated integers") from None
        return conditions, seeds

    def check(self) -> None:
        self.parsed()
        if self.directions not in ("pca", "sae") and not Path(self.directions).is_file():
            raise InputError(f"--directions {self.directions!r}: choose pca, sae, or an existing .safetensors file")
        if self.directions == "sae" and (self.sae is None or not self.latents):
            raise InputError("--directions sae needs --sae DICTIONARY_FOLDER and --latents 12,345")
        if self.n_components < 1 or self.rank < 1 or self.top < 1:
            raise InputError("--n-components, --top and --rank must be >= 1")
        FinetuneConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr).check()


def run_caft(config: CaftConfig, model: Model | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every (seed, condition); returns one row per run (also in ``OUT/results.jsonl``)."""
    from interp.cli import parse_layers
    from interp.models import load_model

    config.check()
    conditions, seeds = config.parsed()
    task = load_task(config.task, n_train=config.n_train)
    _check_resumable(config)
    model = model or load_model(config.model)  # stays the base model: every run fine-tunes a copy

    def fresh() -> Model:
        return load_model(copy.deepcopy(model.module), tokenizer=model.tokenizer)

    sites = [model.site("resid_post", layer) for layer in parse_layers(config.layers, model.cfg.n_layers)]
    fixed = _fixed_directions(config, model)
    write_config(config, config.out)
    path = config.out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {(r["seed"], r["condition"]) for r in rows}
    if ("base", "base") not in done:
        rows.append(_record(config.out, {"seed": "base", "condition": "base", "directions": 0, **_scores(model, task)}))
    for seed in tqdm(seeds, desc="seeds", disable=not progress):
        ft = FinetuneConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, rank=config.rank,
                            alpha=2.0 * config.rank, seed=seed)
        task_s = load_task(config.task, n_train=config.n_train, seed=seed)
        dir_path = config.out / f"directions-seed{seed}.safetensors"
        need_plain = (seed, "plain") not in done and "plain" in conditions
        need_dirs = fixed is None and not dir_path.is_file() and any(c != "plain" and (seed, c) not in done for c in conditions)
        if need_plain or need_dirs:
            tuned = fresh()
            log = finetune(tuned, task_s, ft, progress=False)
            if need_plain:
                rows.append(_record(config.out, _row(seed, "plain", tuned, task, log, 0)))
            if need_dirs:
                save_directions(_pca(config, model, tuned, task_s, sites), dir_path)
        directions = fixed if fixed is not None else (load_directions(dir_path) if dir_path.is_file() else None)
        for condition in ("caft", "random"):
            if condition not in conditions or (seed, condition) in done:
                continue
            assert directions is not None
            dirs = directions if condition == "caft" else random_directions(directions, seed=1000 + seed)
            tuned = fresh()
            log = finetune(tuned, task_s, ft, directions=dirs, skip_first=config.skip_first, progress=False)
            count = sum(d.shape[0] for d in dirs.values())
            rows.append(_record(config.out, _row(seed, condition, tuned, task, log, count)))
            if condition == "caft" and config.save_model and seed == seeds[0]:
                save_model(tuned, config.out / "model-caft")
    table = pd.DataFrame(rows)
    summary = summarise(table)
    summary.to_csv(config.out / "summary.csv", index=False)
    return table


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each condition's accuracies."""
    g = table.groupby("condition", sort=False)
    out = g[[c for c in ("id_accuracy", "ood_accuracy", "dev_ood_accuracy") if c in table]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["seeds"] = g.size()
    out["directions"] = g["directions"].mean()
    return out.reset_index()


def _scores(model: Model, task: Any) -> dict[str, float]:
    return {"id_accuracy": accuracy(model, task.test_id, task.answers), "ood_accuracy": accuracy(model, task.test_ood, task.answers),
            "dev_ood_accuracy": accuracy(model, task.dev_ood, task.answers)}


def _row(seed: int, condition: str, model: Model, task: Any, log: dict[str, Any], count: int) -> dict[str, Any]:
    return {"seed": seed, "condition": condition, "directions": count, **_scores(model, task),
            "final_loss": log["losses"][-1], "train_seconds": log["seconds"]}


def _record(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _pca(config: CaftConfig, base: Model, tuned: Model, task: Any, sites: list[str]) -> Directions:
    """PCA directions of (tuned - base), kept where they separate the spurious concept's two classes."""
    comps = pca_directions(base, tuned, task.train_texts(), sites, n_components=config.n_components)
    concept = load_concept(config.interpret or task.info["spurious_concept"])
    concept.check()
    table = interpret_components(base, comps, concept.positives[:48], concept.negatives[:48])
    table.to_csv(config.out / "components.csv", mode="a", header=not (config.out / "components.csv").is_file(), index=False)
    kept = select(comps, table, top=config.top, min_effect=config.min_effect)
    if not kept:
        best = table.loc[table["effect_size"].abs().idxmax()]
        raise InputError(f"no principal component separates {concept.name}'s texts by an effect size of {config.min_effect} "
                         f"(largest: {best['effect_size']:.2f} at {best['site']} component {best['component']}); "
                         "lower --min-effect or give directions")
    return kept


def _fixed_directions(config: CaftConfig, model: Model) -> Directions | None:
    if config.directions == "pca":
        return None
    if config.directions == "sae":
        from interp.dictionary import load_dictionary

        assert config.sae is not None and config.latents is not None
        try:
            latents = [int(v) for v in config.latents.split(",")]
        except ValueError:
            raise InputError(f"--latents {config.latents!r}: give comma-separated integers") from None
        return check_directions(model, sae_directions(load_dictionary(config.sae), latents))
    return check_directions(model, load_directions(config.directions))


def _check_resumable(config: CaftConfig) -> None:
    path = config.out / "config.json"
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), config_dict(config)
    # a setting added since the folder was written counts as its default
    changed = sorted(k for k in set(old) | set(new) if k not in ("seeds", "conditions", "save_model")
                     and old.get(k, getattr(CaftConfig, k, None)) != new.get(k))
    if changed:
        raise InputError(f"{config.out} holds CAFT runs with other settings ({', '.join(changed)} differ); "
                         "use another --out, or delete it to start over")
