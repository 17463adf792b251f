"""The ``interp`` command: one subcommand per job, each generated from its config dataclass.

Every job's options are the fields of a dataclass (help text in the field metadata), so the
Python API and the CLI take the same settings; runs that write outputs also write the resolved
config (``config.json``) next to them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer

from interp.config import opt, write_config
from interp.errors import InputError, InterpError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="interp: a mechanistic-interpretability workbench")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check activation stores.")
app.add_typer(store_app, name="store")
lineas_app = typer.Typer(no_args_is_help=True, help="LinEAS / AcT steering maps: fit them on a few texts, apply them in generation.")
app.add_typer(lineas_app, name="lineas")
C = TypeVar("C")


def command(config_cls: type[C], name: str, group: typer.Typer = app) -> Callable[[Callable[[C], None]], Callable[[C], None]]:
    """Register ``run(config)`` as subcommand ``name`` with one option per config field."""
    hints = typing.get_type_hints(config_cls)

    def decorate(run: Callable[[C], None]) -> Callable[[C], None]:
        params = []
        for f in dataclasses.fields(config_cls):
            meta = f.metadata
            default = f.default
            kind = str if meta.get("parse") else _cli_type(hints[f.name])
            flag = f"--{f.name.replace('_', '-')}"
            if meta.get("argument"):
                info = typer.Argument(... if default is dataclasses.MISSING else default, help=meta.get("help", ""))
            else:
                info = typer.Option(... if default is dataclasses.MISSING else default, flag, help=meta.get("help", ""))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind))

        def wrapper(**kwargs: Any) -> None:
            try:
                for f in dataclasses.fields(config_cls):
                    parse = f.metadata.get("parse")
                    if parse and kwargs.get(f.name) is not None:
                        kwargs[f.name] = parse(kwargs[f.name])
                run(config_cls(**kwargs))
            except InterpError as err:
                typer.secho(f"error: {err}", fg="red", err=True)
                raise typer.Exit(2) from None

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__doc__ = (run.__doc__ or "").strip()
        group.command(name)(wrapper)
        return run

    return decorate


def _cli_type(hint: Any) -> Any:
    """Map a dataclass field type onto one typer understands (``X | None`` -> Optional[X])."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return typing.Optional[_cli_type(inner[0])] if len(inner) == 1 else str  # noqa: UP007 - typer needs Optional
    if hint in (int, float, str, bool) or hint is Path:
        return hint
    return str


# ---------------------------------------------------------------------------- jobs


@dataclass
class ModelsConfig:
    pass


@command(ModelsConfig, "models")
def models_cmd(_config: ModelsConfig) -> None:
    """List the embedded models and the architecture families with named sites."""
    from interp.models import ARCHS, EMBEDDED
    from interp.models.embedded import conversion_problem, gguf_path
    from interp.paths import interp_home

    for spec in EMBEDDED.values():
        try:
            source = f"weights in {gguf_path(spec)}"
        except ImportError:
            source = f"NOT INSTALLED: {spec.install}"
        converted = conversion_problem(interp_home() / "models" / spec.name) is None
        typer.echo(f"{spec.name:16s} {spec.description}\n{'':16s} {source}; converted: {converted}")
    typer.echo(f"\nfamilies with a site table: {', '.join(sorted(ARCHS))} (others: mapped by structure)")
    typer.echo("also: any local HF folder, a HF hub id (needs the hub), or a model object in Python")


@dataclass
class SitesConfig:
    model: str = opt(help="embedded name, HF folder or hub id", argument=True)
    pattern: str | None = opt(None, "only sites matching this glob, e.g. 'blocks.3.*'")


@command(SitesConfig, "sites")
def sites_cmd(config: SitesConfig) -> None:
    """List a model's sites with their shapes."""
    from interp.models import load_model

    model = load_model(config.model)
    for name in model.site_names(config.pattern):
        info = model.site_table.info(name)
        typer.echo(f"{name:40s} {' x '.join(str(s) for s in info.shape)}")


@dataclass
class CacheConfig:
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    prompt: str = opt("The capital of France is", "text to run")
    sites: str = opt("blocks.*.hook_resid_post", "glob of sites to cache")
    top_k: int = opt(5, "tokens per layer in the logit-lens table")
    out: Path | None = opt(None, "folder for config.json, shapes.json and logit_lens.csv")


@command(CacheConfig, "cache")
def cache_cmd(config: CacheConfig) -> None:
    """Quick look: run a prompt with a cache, show site shapes and the logit lens per layer."""
    import pandas as pd

    from interp.lens import logit_lens
    from interp.models import load_model

    model = load_model(config.model)
    typer.echo(repr(model))
    typer.echo(f"tokens: {model.to_str_tokens(config.prompt)}")
    cache = model.run_with_cache(config.prompt, config.sites)
    shapes = {name: list(value.shape) for name, value in cache.items()}
    typer.echo(f"cached {len(shapes)} sites, e.g. {next(iter(shapes))}: {next(iter(shapes.values()))}")
    table = logit_lens(model, config.prompt, top_k=config.top_k)
    with pd.option_context("display.max_colwidth", 80, "display.width", 160):
        shown = table.assign(top_tokens=[" ".join(repr(t) for t in row) for row in table["top_tokens"]])
        typer.echo(shown[["layer", "top_tokens", "top_probs"]].to_string(index=False))
    if config.out:
        write_config(config, config.out)
        (config.out / "shapes.json").write_text(json.dumps(shapes, indent=1))
        table.to_csv(config.out / "logit_lens.csv", index=False)
        typer.echo(f"wrote {config.out}/config.json, shapes.json, logit_lens.csv")


from interp.store.write import HarvestConfig  # noqa: E402 - jobs below register in order


@command(HarvestConfig, "harvest")
def harvest_cmd(config: HarvestConfig) -> None:
    """Run the model over a corpus and write the activations of the given sites to a store (resumable)."""
    from interp.store import harvest

    store = harvest(config)
    typer.echo(store.info())


@dataclass
class StorePathConfig:
    store: Path = opt(help="store directory", argument=True)


@command(StorePathConfig, "info", store_app)
def store_info_cmd(config: StorePathConfig) -> None:
    """Summarise a store: model, corpus, sites, rows, size."""
    from interp.store import ActivationStore

    typer.echo(ActivationStore(config.store).info())


@command(StorePathConfig, "verify", store_app)
def store_verify_cmd(config: StorePathConfig) -> None:
    """Recompute the checksum of every shard file and report damaged shards (exit 1 if any)."""
    from interp.store import ActivationStore

    store = ActivationStore(config.store)
    problems = store.verify()
    for line in problems:
        typer.secho(line, fg="red")
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{config.store}: {len(store.shards)} shards, {store.n_rows:,} rows, all checksums match")


from interp.dictionary.train import EvalConfig, TrainConfig, TranscoderTrainConfig  # noqa: E402


def _train_and_report(config: TrainConfig) -> None:
    from interp.dictionary.metrics import metrics_table
    from interp.dictionary.train import train

    results = train(config)
    typer.echo("\n" + metrics_table(results))
    typer.echo(f"\nwrote {config.out}/metrics.json and one folder per dictionary (with a SAELens export in saelens/)")


@command(TrainConfig, "train-sae")
def train_sae_cmd(config: TrainConfig) -> None:
    """Train SAE(s) on a chosen site and layer: harvests the store if needed, prints and writes the metrics."""
    _train_and_report(config)


@command(TranscoderTrainConfig, "train-transcoder")
def train_transcoder_cmd(config: TranscoderTrainConfig) -> None:
    """Train transcoder(s) from an input site to an output site (default: ln2 -> mlp_out of the layer)."""
    _train_and_report(config)


@command(EvalConfig, "eval-sae")
def eval_sae_cmd(config: EvalConfig) -> None:
    """Evaluate a trained dictionary: reconstruction on held-out rows, CE loss with it spliced in."""
    from interp.dictionary.metrics import metrics_table
    from interp.dictionary.train import evaluate

    metrics = evaluate(config)
    typer.echo(metrics_table({config.dictionary.name: metrics}))


@dataclass
class FeaturesConfig:
    dictionary: Path = opt(help="a trained dictionary folder", argument=True)
    latents: str = opt("0,1,2,3,4,5,6,7", "comma-separated latent ids")
    n: int = opt(12, "examples per latent")
    all_rows: bool = opt(False, "search every store row (default: the held-out rows, faster)")
    out: Path | None = opt(None, "HTML page (default: <dictionary>/features.html)")


@command(FeaturesConfig, "features")
def features_cmd(config: FeaturesConfig) -> None:
    """Top-activating examples of latents: a table per latent here, and a static HTML page."""
    import pandas as pd

    from interp.dictionary.features import latent_examples, latent_summary, top_activations
    from interp.dictionary.io import load_dictionary, read_meta
    from interp.models import load_model
    from interp.store import ActivationStore
    from interp.viz import latent_section, write_dashboard

    meta = read_meta(config.dictionary)
    dictionary = load_dictionary(config.dictionary)
    store = ActivationStore(meta["store"])
    model = load_model(dictionary.config.model)
    latents = [int(v) for v in config.latents.split(",") if v.strip()]
    rows = None if config.all_rows else tuple(meta["held_out_rows"])
    top = top_activations(dictionary, store, latents, n=config.n, rows=rows)
    sections = []
    for latent in latents:
        examples = latent_examples(dictionary, store, model.tokenizer, latent, top=top)
        summary = latent_summary(dictionary, latent, model)
        typer.echo(f"\nlatent {latent}" + (f"  promotes {summary['promotes'][:5]}" if "promotes" in summary else ""))
        if not examples.empty:
            with pd.option_context("display.width", 160, "display.max_colwidth", 60):
                typer.echo(examples[["activation", "left", "token", "right"]].to_string(index=False))
        sections.append(latent_section(latent, examples, summary))
    page = write_dashboard(config.out or config.dictionary / "features.html", sections, f"{config.dictionary.name}: top activations")
    typer.echo(f"\nwrote {page}")


@dataclass
class PatchConfig:
    task: str = opt("ioi", "ioi or factual")
    method: str = opt("activation", "activation, attribution or relp")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    n: int = opt(8, "prompt pairs")
    template: int = opt(0, "ioi: which template")
    kinds: str = opt("resid_pre,attn_out,mlp_out", "site kinds to patch (z for attention heads)")
    heads: bool = opt(False, "patch attention heads (kind z) one by one")
    per_position: bool = opt(True, "one cell per position (else all positions at once)")
    direction: str = opt("denoising", "denoising (clean into corrupt) or noising")
    rules: str = opt("ln,identity,half", "relp: LRP rules (ln, identity, half, attention; all; none)")
    seed: int = opt(0, "seed for the prompt pairs")
    out: Path = opt(Path("runs/patch"), "folder for config.json, cells.csv and heatmap.html")


@command(PatchConfig, "patch")
def patch_cmd(config: PatchConfig) -> None:
    """Activation, attribution or relevance patching on a built-in task; table, heatmap and timing."""
    from interp.models import load_model
    from interp.patching import TASKS, Rules, activation_patching, attribution_patching

    if config.task not in TASKS or config.method not in ("activation", "attribution", "relp"):
        raise InputError(f"--task must be one of {', '.join(TASKS)} and --method one of activation, attribution, relp")
    model = load_model(config.model)
    kwargs = {"template": config.template} if config.task == "ioi" else {}
    task = TASKS[config.task](model, config.n, seed=config.seed, **kwargs)
    typer.echo(task.summary())
    kinds = [k.strip() for k in config.kinds.split(",") if k.strip()]
    common = dict(direction=config.direction, per_position=config.per_position, heads=config.heads)
    if config.method == "activation":
        result = activation_patching(model, task, kinds, **common)
    else:
        rules = Rules.parse(config.rules) if config.method == "relp" else None
        result = attribution_patching(model, task, kinds, rules=rules, **common)
    write_config(config, config.out)
    result.table.to_csv(config.out / "cells.csv", index=False)
    result.heatmap().write_html(config.out / "heatmap.html", include_plotlyjs="directory")  # plotly.min.js beside it: works offline
    top = result.table.reindex(result.table.score.abs().sort_values(ascending=False).index).head(10)
    typer.echo(top[["kind", "layer", "position", "head", "score"]].to_string(index=False))
    typer.echo(f"{len(result.table)} cells in {result.seconds:.1f} s; wrote {config.out}/cells.csv and heatmap.html")


@dataclass
class ProbeConfig:
    concept: str = opt("sentiment", "concept: a JSONL file (text + label, or positive + negative pairs) or a built-in "
                                    "name (sentiment, sentiment_pairs, wedding, space)")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    layers: str = opt("all", "layers to probe: all, a range like 4-12, or a list like 3,6,9")
    site: str = opt("resid_post", "site kind probed at each layer (resid_post, mlp_out, attn_out, ...)")
    methods: str = opt("logistic,diff-means", "probe methods: logistic, diff-means")
    reduce: str = opt("last", "a text's activation: last token, or mean over tokens")
    test_fraction: float = opt(0.25, "share of each class held out (unless the file gives splits)")
    seed: int = opt(0, "seed for the held-out split")
    C: float = opt(1.0, "logistic regression: inverse L2 penalty")
    out: Path = opt(Path("runs/probe"), "folder for config.json, table.csv, accuracy.html and probes.safetensors")


@command(ProbeConfig, "probe")
def probe_cmd(config: ProbeConfig) -> None:
    """Train probes per layer on a concept's texts: held-out accuracy and AUROC table, and a plot."""
    from interp.data.concepts import load_concept
    from interp.models import load_model
    from interp.probes import MIN_PROBE_PER_CLASS, REDUCTIONS, check_method, train_probes

    methods = [check_method(m.strip()) for m in config.methods.split(",") if m.strip()]
    if config.reduce not in REDUCTIONS:
        raise InputError(f"--reduce {config.reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    concept = load_concept(config.concept)
    concept.check(MIN_PROBE_PER_CLASS, "a probe")
    model = load_model(config.model)
    layers = parse_layers(config.layers, model.cfg.n_layers)
    sites = [model.site(config.site, layer) for layer in layers]
    result = train_probes(model, concept, sites, methods=methods, reduce=config.reduce, test_fraction=config.test_fraction,
                          seed=config.seed, C=config.C)
    write_config(config, config.out)
    result.save(config.out)
    table = result.table
    wide = table.pivot(index="layer", columns="method", values=["test_accuracy", "test_auroc"])
    wide.columns = [f"{method} {metric.replace('test_', 'held-out ')}" for metric, method in wide.columns]
    typer.echo(f"{concept!r}: {int(table['n_train'].iloc[0])} training and {int(table['n_test'].iloc[0])} held-out texts, "
               f"{config.reduce} token, {config.site}")
    typer.echo(wide.round(3).to_string())
    typer.echo(f"wrote {config.out}/table.csv, accuracy.html, probes.safetensors (+ .json), config.json")


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all', '4-12' or '3,6,9' -> layer numbers, each checked against the model's range."""
    if text.strip() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise InputError(f"--layers {text!r}: give all, a range like 4-12, or a list like 3,6,9") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise InputError(f"--layers {text!r}: layer(s) {bad} out of range; the model has layers 0-{n_layers - 1}")
    return sorted(set(layers))


from interp.steering.job import SteerConfig  # noqa: E402


@command(SteerConfig, "steer")
def steer_cmd(config: SteerConfig) -> None:
    """Steer generations with a concept direction: side by side for one strength, a table + plot folder for --sweep."""
    from interp.steering.job import run_steer
    from interp.steering.sweep import SweepResult

    result = run_steer(config)
    for note in result.notes:
        typer.echo(note)
    if isinstance(result, SweepResult):
        out = config.out or Path("runs/steer")
        shown = result.side_by_side(prompts=range(3))
        _print_side_by_side(shown.drop(columns="prompt_index"), f"first prompts, {shown.columns[3].rsplit(' ', 1)[0]}")
        table = result.table.drop(columns=["tokens"]).rename(columns={"score": "score (mean)"})
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        typer.echo(f"score: {result.score_name}; perplexity of the continuations under the unsteered model")
        typer.echo(f"wrote {out}/table.csv, sweep.html, generations.jsonl, generations/, vectors/, config.json")
        return
    table = result.side_by_side
    shown = table[["prompt", "unsteered", "steered"]].copy()
    for column in ("unsteered", "steered"):
        scores = table[f"{column}_score"]
        if scores.notna().any():
            shown[column] = [f"{text}  [{score:+.2f}]" for text, score in zip(table[column], scores, strict=True)]
    _print_side_by_side(shown, f"strength {config.strength:g} ({config.units})" if not config.ablate else "direction projected out")
    typer.echo(result.summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if config.out is not None:
        typer.echo(f"wrote {config.out}/generations.jsonl, summary.csv, vectors/, config.json")


from interp.steering.lineas_job import LineasApplyConfig, LineasFitConfig  # noqa: E402


@command(LineasFitConfig, "fit", lineas_app)
def lineas_fit_cmd(config: LineasFitConfig) -> None:
    """Fit LinEAS (or Mean-AcT / Linear-AcT) maps moving source texts' activations towards target texts'."""
    from interp.steering.lineas_job import run_lineas_fit

    maps = run_lineas_fit(config)
    active = maps.active_units()
    info = maps.info
    loss = f"; loss {info['loss_first']:.1f} -> {info['loss_last']:.1f}" if "loss_first" in info else ""
    typer.echo(f"{maps.method}: {len(maps.sites)} sites, {sum(active.values())} of "
               f"{sum(w.numel() for w in maps.weight.values())} units changed{loss}; {info['seconds']:.1f} s")
    typer.echo("units changed per site: " + ", ".join(f"{s} {n}" for s, n in active.items()))
    typer.echo(f"wrote {config.out}/maps.safetensors, maps.json, config.json")


@command(LineasApplyConfig, "apply", lineas_app)
def lineas_apply_cmd(config: LineasApplyConfig) -> None:
    """Generate with fitted maps: side by side at one strength, or a table + plot folder for --sweep."""
    from interp.steering.lineas_job import run_lineas_apply
    from interp.steering.sweep import SweepResult

    result = run_lineas_apply(config)
    if isinstance(result, SweepResult):
        typer.echo(result.table.drop(columns=["tokens", "added_norm"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        typer.echo(f"wrote {config.out or Path('runs/lineas-apply')}/table.csv, sweep.html, generations.jsonl, config.json")
        return
    table, summary = result
    shown = table[["prompt", "unsteered", "steered"]].copy()
    for column in ("unsteered", "steered"):
        if table[f"{column}_score"].notna().any():
            shown[column] = [f"{t}  [{v:+.2f}]" for t, v in zip(table[column], table[f"{column}_score"], strict=True)]
    _print_side_by_side(shown, f"strength {config.strength:g}")
    typer.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


from interp.steering.caft_job import CaftConfig  # noqa: E402


@command(CaftConfig, "caft")
def caft_cmd(config: CaftConfig) -> None:
    """Concept-ablation fine-tuning on a two-cue task: plain fine-tuning, CAFT and random-direction CAFT over seeds."""
    from interp.steering.caft_job import run_caft, summarise

    table = run_caft(config)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(summarise(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {config.out}/results.jsonl, summary.csv, config.json")


def _print_side_by_side(table: Any, title: str) -> None:
    import shutil

    from rich.console import Console
    from rich.table import Table

    view = Table(title=title, show_lines=True)
    for column in table.columns:
        view.add_column(str(column), overflow="fold", ratio=1 if column == "prompt" else 2)
    for row in table.itertuples(index=False):
        view.add_row(*[str(v) for v in row])
    Console(width=max(100, shutil.get_terminal_size((160, 40)).columns), soft_wrap=False).print(view)


def main() -> None:
    app()
