"""The ``interp steer`` job: a concept in, steered and unsteered generations out.

``run_steer(SteerConfig(...))`` checks every setting before loading anything heavy, builds the
steering vectors (difference-in-means, probe direction, SAE latent, or a saved vector), then
either generates side by side (one strength) or runs a strength sweep into an output folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from interp.config import config_dict, opt, write_config
from interp.data.concepts import Concept, load_concept, load_prompts
from interp.errors import InputError
from interp.paths import atomic_write
from interp.probes import MIN_PROBE_PER_CLASS, REDUCTIONS, fit_probe, probe_metrics
from interp.steering.evaluation import SCORERS, Scorer, continuation_nll, make_scorer, perplexity
from interp.steering.generation import POSITIONS, Steering, generate
from interp.steering.sweep import SweepResult, sweep
from interp.steering.vectors import UNITS, SteeringVector, check_strength, concept_latents, diff_in_means, latent_vector, probe_vector, site_mean_norm

if TYPE_CHECKING:
    from interp.models.model import Model

VECTOR_METHODS = ("diff-means", "probe", "sae")


@dataclass
class SteerConfig:
    concept: str = opt("sentiment", "concept: a JSONL file (text + label, or positive + negative pairs) or a built-in "
                                    "name (sentiment, sentiment_pairs, wedding, space, war)")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    layer: int = opt(9, "layer of the steered site (9: best for sentiment on SmolLM2's development prompts)")
    site: str = opt("resid_post", "site kind (resid_post, mlp_out, attn_out, ...) or a full site name")
    method: str = opt("diff-means", "direction: diff-means, probe or sae (a comma-separated list compares them in a sweep)")
    strength: float = opt(0.25, "strength in --units (negative pushes away from the concept)")
    units: str = opt("norm", "norm: multiples of the site's mean activation norm; absolute: the added vector's norm")
    positions: str = opt("all", "where to add: all, prompt (prompt tokens only) or generated (new tokens only)")
    prompt: str | None = opt(None, "a prompt to continue (or use --prompts)")
    prompts: str | None = opt(None, "prompt file (.txt, one per line, or .jsonl) or a built-in list: neutral_dev, neutral_test")
    sweep: str | None = opt(None, "comma-separated strengths, e.g. 0,0.25,0.5,1 (use --sweep=-1,0,1 for negatives): "
                                  "writes table, plot and generations to --out")
    sae: Path | None = opt(None, "dictionary folder (from train-sae) for --method sae")
    latent: int = opt(-1, "SAE latent to steer with; -1 picks the one with the largest effect size (positive vs negative texts)")
    vector: Path | None = opt(None, "a saved steering vector (.safetensors from SteeringVector.save), instead of --method")
    ablate: bool = opt(False, "project the direction out of the site instead of adding it")
    reduce: str = opt("last", "a text's activation for building vectors: last token, or mean over tokens")
    max_new_tokens: int = opt(40, "tokens to generate")
    temperature: float = opt(0.0, "0: greedy; above 0: sampling, seeded by --seed")
    top_p: float = opt(1.0, "nucleus sampling threshold (with --temperature > 0)")
    seed: int = opt(0, "seed for sampling and for the probe's train/test split")
    batch_size: int = opt(32, "prompts per generation batch")
    scorer: str = opt("auto", "concept score: auto (the concept's word list if it has one, else VADER), vader, lexicon:PATH, none")
    out: Path | None = opt(None, "output folder (a sweep defaults to runs/steer)")

    def methods(self) -> list[str]:
        methods = [m.strip() for m in self.method.split(",") if m.strip()]
        bad = [m for m in methods if m not in VECTOR_METHODS]
        if bad or not methods:
            raise InputError(f"--method {self.method!r}: choose from {', '.join(VECTOR_METHODS)} (comma-separated for a sweep)")
        return methods

    def strengths(self) -> list[float] | None:
        if self.sweep is None:
            return None
        values = []
        for item in self.sweep.split(","):
            try:
                values.append(check_strength(float(item)))
            except ValueError:
                raise InputError(f"--sweep {self.sweep!r}: {item.strip()!r} is not a finite number") from None
        return values

    def check(self) -> None:
        """Every setting that can be checked without the model."""
        check_strength(self.strength)
        self.strengths()
        methods = self.methods()
        if self.sweep is None and len(methods) > 1:
            raise InputError("several --method values compare directions in a sweep: add --sweep")
        choices = {"units": (self.units, UNITS), "positions": (self.positions, POSITIONS), "reduce": (self.reduce, REDUCTIONS)}
        for flag, (value, valid) in choices.items():
            if value not in valid:
                raise InputError(f"--{flag} {value!r}: choose one of {', '.join(valid)}")
        if not (self.scorer in ("auto", "vader", "none") or self.scorer.startswith("lexicon:")):
            raise InputError(f"--scorer {self.scorer!r}: choose one of {', '.join(SCORERS)}")
        if self.prompt is None and self.prompts is None:
            raise InputError("give --prompt TEXT or --prompts FILE (e.g. --prompts neutral_test)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError("--max-new-tokens and --batch-size must be >= 1, --temperature >= 0, --top-p in (0, 1]")
        if "sae" in methods and self.vector is None and self.sae is None:
            raise InputError("--method sae needs --sae DICTIONARY_FOLDER (train one with `interp train-sae`)")
        if self.sae is not None and not (self.sae / "dictionary.json").is_file():
            raise InputError(f"--sae {self.sae}: not a dictionary folder (no dictionary.json)")


@dataclass
class SteerOutput:
    """One strength: the generations side by side, and a summary per column."""

    side_by_side: pd.DataFrame  # prompt, unsteered, steered (+ their scores)
    summary: pd.DataFrame  # run, score, perplexity
    vectors: dict[str, SteeringVector]
    notes: list[str]


def run_steer(config: SteerConfig, model: Model | None = None) -> SteerOutput | SweepResult:
    """Build the vectors and steer (side by side for one strength, a sweep folder for ``--sweep``)."""
    from interp.models import load_model

    config.check()
    if config.sweep is not None:
        _check_resumable(config, config.out or Path("runs/steer"))
    concept = load_concept(config.concept) if config.vector is None or config.units == "norm" else None
    if concept is not None and config.vector is None:
        concept.check()
        if "probe" in config.methods():
            concept.check(MIN_PROBE_PER_CLASS, "a probe")
    prompts = [config.prompt] if config.prompt is not None else load_prompts(config.prompts)
    scorer = make_scorer(config.scorer, concept)
    model = model or load_model(config.model)
    site = _site(model, config)
    notes: list[str] = []
    vectors = build_vectors(model, config, concept, site, notes)
    norms = {}
    if config.units == "norm":
        norms = {v.site: site_mean_norm(model, v.site, concept.texts) for v in vectors.values()}
        notes += [f"mean activation norm of {s} over the concept's texts: {n:.1f}" for s, n in norms.items()]
    strengths = config.strengths()
    if strengths is not None:
        out = config.out or Path("runs/steer")
        write_config(config, out)
        for name, v in vectors.items():
            v.save(out / "vectors" / f"{name}.safetensors")
        result = sweep(model, vectors, strengths, prompts, scorer=scorer, units=config.units, mean_norms=norms,
                       positions=config.positions, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                       top_p=config.top_p, seed=config.seed, batch_size=config.batch_size, out=out)
        result.notes = notes
        return result
    (name, vector), = vectors.items()
    if config.ablate:
        edit = Steering(vector.site, vector.direction, config.positions, mode="project-out")
    else:
        edit = Steering(vector.site, vector.scaled(config.strength, config.units, norms.get(vector.site)), config.positions)
    common = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                  seed=config.seed, batch_size=config.batch_size)
    runs = {"unsteered": generate(model, prompts, (), **common), "steered": generate(model, prompts, edit, **common)}
    output = _side_by_side(model, runs, scorer, vectors, notes)
    if config.out is not None:
        write_config(config, config.out)
        vector.save(config.out / "vectors" / f"{name}.safetensors")
        atomic_write(config.out / "generations.jsonl",
                     lambda tmp: output.side_by_side.to_json(tmp, orient="records", lines=True, force_ascii=False))
        atomic_write(config.out / "summary.csv", lambda tmp: output.summary.to_csv(tmp, index=False))
    return output


def _check_resumable(config: SteerConfig, out: Path) -> None:
    """A sweep folder may be run again with more strengths or methods; any other change is refused
    before anything in it is overwritten."""
    path = out / "config.json"
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), config_dict(config)
    changed = sorted(k for k in set(old) | set(new) if k not in ("sweep", "method") and old.get(k) != new.get(k))
    if changed:
        raise InputError(f"{out} holds a sweep run with other settings ({', '.join(changed)} differ); "
                         "use another --out, or delete it to start over")


def _site(model: Model, config: SteerConfig) -> str:
    n = model.cfg.n_layers
    if "." in config.site or config.site.startswith("hook_"):
        return model.site_table.check(config.site)
    if not 0 <= config.layer < n:
        raise InputError(f"--layer {config.layer} is out of range: {model.cfg.name} has layers 0-{n - 1}")
    return model.site(config.site, config.layer)


def build_vectors(model: Model, config: SteerConfig, concept: Concept | None, site: str, notes: list[str]) -> dict[str, SteeringVector]:
    """The steering vectors the config asks for, keyed by method name."""
    if config.vector is not None:
        vector = SteeringVector.load(config.vector)
        model.site_table.check(vector.site)
        notes.append(f"vector {config.vector} ({vector.source}) at {vector.site}")
        return {vector.source: vector}
    assert concept is not None
    vectors: dict[str, SteeringVector] = {}
    for method in config.methods():
        if method == "diff-means":
            vectors[method] = diff_in_means(model, concept, site, reduce=config.reduce, batch_size=config.batch_size)
            notes.append(f"diff-means: {concept.name} ({concept.counts()[0]} vs {concept.counts()[1]} texts) at {site}, "
                         f"norm {vectors[method].info['norm']:.2f}")
        elif method == "probe":
            vectors[method] = _probe(model, concept, site, config, notes)
        else:
            vectors[method] = _sae_latent(model, concept, site, config, notes)
    return vectors


def _probe(model: Model, concept: Concept, site: str, config: SteerConfig, notes: list[str]) -> SteeringVector:
    from interp.probes import concept_activations

    train, test = concept.split(0.25, config.seed)
    x = concept_activations(model, concept.texts, [site], reduce=config.reduce, batch_size=config.batch_size)[site]
    y = np.asarray(concept.labels)
    probe = fit_probe(x[train], y[train], "logistic", site=site, reduce=config.reduce)
    probe.metrics = {f"test_{k}": v for k, v in probe_metrics(probe, x[test], y[test]).items()}
    notes.append(f"probe: logistic regression at {site}, held-out accuracy {probe.metrics['test_accuracy']:.3f} "
                 f"({len(test)} texts), AUROC {probe.metrics['test_auroc']:.3f}")
    return probe_vector(probe)


def _sae_latent(model: Model, concept: Concept, site: str, config: SteerConfig, notes: list[str]) -> SteeringVector:
    from interp.dictionary import load_dictionary

    assert config.sae is not None
    dictionary = load_dictionary(config.sae)
    dict_site = dictionary.config.output_site if dictionary.config.is_transcoder else dictionary.config.input_site
    if dict_site != site:
        raise InputError(f"--sae {config.sae} writes {dict_site}, but --layer/--site select {site}; steer the dictionary's site")
    latent = config.latent
    if latent < 0:
        ranking = concept_latents(model, dictionary, concept, reduce="mean", top=5, batch_size=config.batch_size)
        latent = int(ranking["latent"].iloc[0])
        best = ranking.iloc[0]
        notes.append(f"sae: latent {latent} of {config.sae}, the largest effect size on the concept's texts ({best['effect_size']:.2f}; "
                     f"fires on {best['fires_positive']:.0%} of positive and {best['fires_negative']:.0%} of negative texts; "
                     f"runners-up {ranking['latent'].iloc[1:].tolist()})")
    else:
        notes.append(f"sae: latent {latent} of {config.sae}")
    return latent_vector(dictionary, latent, name=str(config.sae))


def _side_by_side(model: Model, runs: dict[str, Any], scorer: Scorer | None, vectors: dict[str, SteeringVector],
                  notes: list[str]) -> SteerOutput:
    table = pd.DataFrame({"prompt": runs["unsteered"].prompts})
    summary = []
    for name, gens in runs.items():
        table[name] = gens.texts
        scores = scorer(gens.texts) if scorer is not None else np.full(len(gens.texts), math.nan)
        table[f"{name}_score"] = scores
        nll, counts = continuation_nll(model, gens)
        summary.append({"run": name, "score": float(np.mean(scores)), "perplexity": perplexity(nll, counts)})
    notes.append(f"score: {getattr(scorer, 'description', 'none')}; perplexity of the continuations under the unsteered model")
    return SteerOutput(table, pd.DataFrame(summary), vectors, notes)
