"""The ``interp`` command: one subcommand per job, each generated from its config dataclass.

Every job's options are the fields of a dataclass (help text in the field metadata), so the
Python API and the CLI take the same settings; runs that write outputs also write the resolved
config (``config.json``) next to them.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer

from interp.config import opt, write_config
from interp.errors import InputError, InterpError
from interp.paths import atomic_write, write_json

app = typer.Typer(add_completion=False, no_args_is_help=True, help="interp: a mechanistic-interpretability workbench")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check activation stores.")
app.add_typer(store_app, name="store")
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
            if kind is bool:  # both switches, so that a True default can be turned off
                flag = f"{flag}/--no-{f.name.replace('_', '-')}"
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
    """List a model's sites: shape, and which tensor of which module each one reads."""
    from interp.models import load_model

    model = load_model(config.model)
    typer.echo(repr(model))
    layer = None
    for name in model.site_names(config.pattern):
        info = model.site_table.info(name)
        if info.layer != layer:
            layer = info.layer
            typer.echo("")
        shape = " x ".join(str(s) for s in info.shape)
        typer.echo(f"{name:34s} {shape:26s} <- {model.site_table.reads(name)}")


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
        write_json(config.out / "shapes.json", shapes)
        atomic_write(config.out / "logit_lens.csv", lambda tmp: table.to_csv(tmp, index=False))
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
    method: str = opt("activation", "activation, attribution, atpstar (AtP*: attribution with the QK fix) or relp")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    n: int = opt(8, "prompt pairs")
    template: int = opt(0, "which template of the split")
    split: str = opt("original", "template list: original, dev or test (held-out templates)")
    kinds: str = opt("resid_pre,attn_out,mlp_out", "site kinds to patch (z for attention heads)")
    heads: bool = opt(False, "patch attention heads (kind z) one by one")
    per_position: bool = opt(True, "one cell per position (else all positions at once)")
    direction: str = opt("denoising", "denoising (clean into corrupt) or noising")
    rules: str = opt("default", "relp: LRP rules (ln, ln_blocks, ln_final, identity, half, signal, attention; all; none; default)")
    seed: int = opt(0, "seed for the prompt pairs")
    out: Path = opt(Path("runs/patch"), "folder for config.json, cells.csv and heatmap.html")


@command(PatchConfig, "patch")
def patch_cmd(config: PatchConfig) -> None:
    """Activation, attribution or relevance patching on a built-in task; table, heatmap and timing."""
    from interp.models import load_model
    from interp.patching import SPLITS, TASKS, Rules, activation_patching, atp_star, attribution_patching, templates

    methods = ("activation", "attribution", "atpstar", "relp")
    method = "atpstar" if config.method == "atp*" else config.method
    if config.task not in TASKS or method not in methods:
        raise InputError(f"--task must be one of {', '.join(TASKS)} and --method one of {', '.join(methods)}")
    if config.split not in SPLITS:
        raise InputError(f"--split {config.split!r}: choose from {', '.join(SPLITS)}")
    count = len(templates(config.task, config.split))
    if not 0 <= config.template < count:
        raise InputError(f"--template {config.template}: the {config.split} split of {config.task} has templates 0..{count - 1}")
    rules = Rules() if config.rules == "default" else Rules.parse(config.rules)
    model = load_model(config.model)
    task = TASKS[config.task](model, config.n, template=config.template, split=config.split, seed=config.seed)
    typer.echo(task.summary())
    kinds = [k.strip() for k in config.kinds.split(",") if k.strip()]
    common = dict(direction=config.direction, per_position=config.per_position, heads=config.heads)
    if method == "activation":
        result = activation_patching(model, task, kinds, **common)
    elif method == "atpstar":
        result = atp_star(model, task, kinds, **common)
    else:
        result = attribution_patching(model, task, kinds, rules=rules if method == "relp" else None, **common)
    write_config(config, config.out)
    atomic_write(config.out / "cells.csv", lambda tmp: result.table.to_csv(tmp, index=False))
    # plotly.min.js beside the page (written by plotly itself): works offline
    atomic_write(config.out / "heatmap.html", lambda tmp: result.heatmap().write_html(tmp, include_plotlyjs="directory"))
    top = result.table.reindex(result.table.score.abs().sort_values(ascending=False).index).head(10)
    typer.echo(top[["kind", "layer", "position", "head", "score"]].to_string(index=False))
    typer.echo(f"{len(result.table)} cells in {result.seconds:.1f} s; wrote {config.out}/cells.csv and heatmap.html")


def main() -> None:
    app()
