"""The ``interp lineas fit`` and ``interp lineas apply`` jobs.

``fit``: source and target texts (a labelled concept file, or two text lists) in, an
``AffineMaps`` folder out (``maps.safetensors`` + ``maps.json`` + ``config.json``).
``apply``: a maps folder and prompts in, steered and unsteered generations side by side, or a
strength sweep (lambda in [0, 1]) written as a table, a plot and the generations.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from interp.config import opt, write_config
from interp.data.concepts import load_concept, load_prompts
from interp.errors import InputError
from interp.steering.evaluation import SCORERS, continuation_nll, make_scorer, perplexity
from interp.steering.generation import POSITIONS, generate
from interp.steering.lineas import METHODS, MIN_TEXTS, AffineMaps, check_lambda, fit_maps
from interp.steering.sweep import SweepResult, sweep

if TYPE_CHECKING:
    from interp.models.model import Model

TOWARDS = ("positive", "negative")


@dataclass
class LineasFitConfig:
    concept: str = opt("sentiment", "labelled concept (JSONL or a built-in name): source and target texts are its two classes")
    towards: str = opt("positive", "positive: move label-0 texts towards label-1 texts; negative: the other way")
    source: str | None = opt(None, "source texts instead of --concept (.txt one per line, or .jsonl with \"prompt\")")
    target: str | None = opt(None, "target texts instead of --concept (same formats)")
    n_texts: int = opt(32, f"texts per side (at least {MIN_TEXTS}; LinEAS needs 32 or fewer), a seeded draw")
    method: str = opt("lineas", f"one of {', '.join(METHODS)}")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    layers: str = opt("2-9", "layers whose site gets a map: a range like 2-9 or a list like 3,6,9")
    site: str = opt("resid_post", "site kind mapped at each layer (resid_post, attn_out, mlp_out, ...)")
    steps: int = opt(100, "LinEAS: optimisation steps")
    lr: float = opt(0.02, "LinEAS: Adam step size")
    l1: float = opt(0.0, "LinEAS: L1 strength of the sparse group lasso")
    group: float = opt(0.8, "LinEAS: group strength of the sparse group lasso, in units of the loss gradient (larger: fewer units change; 0.8 chosen on neutral_dev)")
    seed: int = opt(0, "seed for the draw of texts and the LinEAS batches")
    checkpoint_every: int = opt(10, "LinEAS: steps between writes of the fit's state (OUT/fit-state.safetensors)")
    resume: bool = opt(False, "LinEAS: continue an interrupted fit in --out from its last state")
    out: Path = opt(Path("runs/lineas"), "output folder (maps.safetensors, maps.json, config.json)")

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.towards not in TOWARDS:
            raise InputError(f"--towards {self.towards!r}: choose one of {', '.join(TOWARDS)}")
        if (self.source is None) != (self.target is None):
            raise InputError("give both --source and --target text files, or neither (then --concept's classes are used)")
        if self.n_texts < MIN_TEXTS:
            raise InputError(f"--n-texts {self.n_texts}: at least {MIN_TEXTS} texts per side are needed")
        if self.steps < 1 or self.lr <= 0 or self.l1 < 0 or self.group < 0 or self.checkpoint_every < 1:
            raise InputError("--steps and --checkpoint-every must be >= 1, --lr > 0, --l1 and --group >= 0")

    def texts(self) -> tuple[list[str], list[str]]:
        """Source and target texts: up to ``n_texts`` each, drawn with ``seed``."""
        if self.source is not None and self.target is not None:
            source, target = load_prompts(self.source), load_prompts(self.target)
        else:
            concept = load_concept(self.concept)
            source, target = concept.negatives, concept.positives
            if self.towards == "negative":
                source, target = target, source
        rng = random.Random(self.seed)
        return [rng.sample(side, min(self.n_texts, len(side))) for side in (source, target)]  # type: ignore[return-value]


def run_lineas_fit(config: LineasFitConfig, model: Model | None = None) -> AffineMaps:
    from interp.cli import parse_layers
    from interp.models import load_model

    config.check()
    source, target = config.texts()
    if min(len(source), len(target)) < MIN_TEXTS:
        raise InputError(f"{len(source)} source and {len(target)} target texts: at least {MIN_TEXTS} of each are needed")
    model = model or load_model(config.model)
    sites = [model.site(config.site, layer) for layer in parse_layers(config.layers, model.cfg.n_layers)]
    state = config.out / "fit-state.safetensors"
    if config.method == "lineas" and state.is_file() and not config.resume:
        raise InputError(f"{config.out} holds an interrupted LinEAS fit; pass --resume to continue it, or delete {state}")
    lineas = {"steps": config.steps, "lr": config.lr, "l1": config.l1, "group": config.group, "seed": config.seed,
              "checkpoint": state, "checkpoint_every": config.checkpoint_every, "resume": config.resume}
    start = time.perf_counter()
    maps = fit_maps(model, config.method, source, target, sites, **(lineas if config.method == "lineas" else {}))
    maps.info.update({"seconds": time.perf_counter() - start, "concept": config.concept if config.source is None else None,
                      "towards": config.towards, "model": model.cfg.name})
    write_config(config, config.out)
    maps.save(config.out / "maps.safetensors")
    state.unlink(missing_ok=True)  # the maps are written: nothing left to resume
    return maps


@dataclass
class LineasApplyConfig:
    maps: Path = opt(Path("runs/lineas"), "maps folder (from `interp lineas fit`) or its maps.safetensors")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id (the one the maps were fitted on)")
    strength: float = opt(1.0, "lambda in [0, 1]: 0 is the unsteered model, 1 the fitted map")
    prompt: str | None = opt(None, "a prompt to continue (or use --prompts)")
    prompts: str | None = opt(None, "prompt file (.txt or .jsonl) or a built-in list: neutral_dev, neutral_test")
    sweep: str | None = opt(None, "comma-separated strengths in [0, 1], e.g. 0.25,0.5,1: writes table, plot and generations to --out")
    positions: str = opt("all", "where the maps act: all, prompt or generated")
    max_new_tokens: int = opt(40, "tokens to generate")
    temperature: float = opt(0.0, "0: greedy; above 0: sampling, seeded by --seed")
    top_p: float = opt(1.0, "nucleus sampling threshold (with --temperature > 0)")
    seed: int = opt(0, "sampling seed")
    batch_size: int = opt(32, "prompts per generation batch")
    scorer: str = opt("vader", f"concept score: {', '.join(SCORERS)}")
    out: Path | None = opt(None, "output folder (a sweep defaults to runs/lineas-apply)")

    def strengths(self) -> list[float] | None:
        if self.sweep is None:
            return None
        try:
            values = [float(v) for v in self.sweep.split(",")]
        except ValueError:
            raise InputError(f"--sweep {self.sweep!r}: give comma-separated numbers in [0, 1]") from None
        return [check_lambda(v) for v in values]

    def check(self) -> None:
        check_lambda(self.strength)
        self.strengths()
        if self.positions not in POSITIONS:
            raise InputError(f"--positions {self.positions!r}: choose one of {', '.join(POSITIONS)}")
        if self.prompt is None and self.prompts is None:
            raise InputError("give --prompt TEXT or --prompts FILE (e.g. --prompts neutral_test)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError("--max-new-tokens and --batch-size must be >= 1, --temperature >= 0, --top-p in (0, 1]")


def run_lineas_apply(config: LineasApplyConfig, model: Model | None = None) -> tuple[pd.DataFrame, pd.DataFrame] | SweepResult:
    """Side by side (generations table, summary) for one strength, or a ``SweepResult`` for ``--sweep``."""
    from interp.models import load_model

    config.check()
    maps = AffineMaps.load(config.maps)
    prompts = [config.prompt] if config.prompt is not None else load_prompts(config.prompts)
    scorer = make_scorer(config.scorer)
    model = model or load_model(config.model)
    maps.check_model(model)
    common: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                                  seed=config.seed, batch_size=config.batch_size)
    strengths = config.strengths()
    if strengths is not None:
        out = config.out or Path("runs/lineas-apply")
        write_config(config, out)
        return sweep(model, {maps.method: maps}, strengths, prompts, scorer=scorer, positions=config.positions, out=out, **common)
    runs = {"unsteered": generate(model, prompts, (), **common),
            "steered": generate(model, prompts, maps.steering(config.strength, config.positions), **common)}
    table = pd.DataFrame({"prompt": prompts})
    summary = []
    for name, gens in runs.items():
        scores = scorer(gens.texts) if scorer is not None else np.full(len(prompts), np.nan)
        table[name], table[f"{name}_score"] = gens.texts, scores
        summary.append({"run": name, "score": float(np.mean(scores)), "perplexity": perplexity(*continuation_nll(model, gens))})
    if config.out is not None:
        write_config(config, config.out)
        table.to_json(config.out / "generations.jsonl", orient="records", lines=True, force_ascii=False)
    return table, pd.DataFrame(summary)
