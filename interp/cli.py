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

from interp.config import opt, parse_count, parse_layers, write_config
from interp.distributed import close_process_group
from interp.errors import InputError, InterpError
from interp.paths import atomic_write, write_json

app = typer.Typer(add_completion=False, no_args_is_help=True, help="interp: a mechanistic-interpretability workbench")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check activation stores.")
app.add_typer(store_app, name="store")
experiment_app = typer.Typer(no_args_is_help=True, help="Run experiment files (experiments/*.toml) into results folders.")
app.add_typer(experiment_app, name="experiment")


class DefaultCommandGroup(typer.core.TyperGroup):
    """A group whose first subcommand also runs when none is named: ``interp lens PROMPT`` = ``interp lens show PROMPT``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


lens_app = typer.Typer(cls=DefaultCommandGroup, no_args_is_help=True,
                       help="Lenses: `interp lens PROMPT` reads every layer; `interp lens train` trains a tuned or linear-map lens.")
app.add_typer(lens_app, name="lens")
neurons_app = typer.Typer(no_args_is_help=True, help="MLP neurons: decode through the unembedding, clamp during generation.")
app.add_typer(neurons_app, name="neurons")
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
            finally:
                close_process_group()

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
    remote: bool = opt(False, "run on NDIF through nnsight's remote execution (hub id; needs NDIF_API_KEY); "
                              "prints the cached shapes and norms")


@command(CacheConfig, "cache")
def cache_cmd(config: CacheConfig) -> None:
    """Quick look: run a prompt with a cache, show site shapes and the logit lens per layer."""
    import pandas as pd

    from interp.lens import logit_lens
    from interp.models import load_model

    if config.remote:
        from interp.models.remote import RemoteModel

        cache = RemoteModel(config.model).run_with_cache(config.prompt, config.sites)
        for name, value in cache.items():
            typer.echo(f"{name:34s} {str(list(value.shape)):18s} mean norm {float(value.float().norm(dim=-1).mean()):.3f}")
        return
    model = load_model(config.model)
    typer.echo(repr(model))
    typer.echo(f"tokens: {model.to_str_tokens(config.prompt)}")
    cache = model.run_with_cache(config.prompt, config.sites)
    shapes = {name: list(value.shape) for name, value in cache.items()}
    typer.echo(f"cached {len(shapes)} sites, e.g. {next(iter(shapes))}: {next(iter(shapes.values()))}")
    table = logit_lens(model, config.prompt, top_k=config.top_k, positions=-1).table
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

    from interp.distributed import ranks

    store = harvest(config)
    if ranks(config.device).is_main:  # under torchrun: one report, from rank 0
        typer.echo(store.info())


@dataclass
class StorePathConfig:
    store: str = opt(help="store directory or fsspec URL (e.g. s3://bucket/store)", argument=True)


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

    from interp.distributed import ranks

    results = train(config)
    if not ranks(config.device).is_main:  # under torchrun: one report, from rank 0
        return
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
    """Top-activating examples of a few latents: a table per latent here, and a dashboard page for them."""
    import pandas as pd

    from interp.dictionary.features import DictionaryFeatures, decoded_tokens, scan_features
    from interp.dictionary.io import load_dictionary, read_meta
    from interp.models import load_model
    from interp.store import ActivationStore
    from interp.viz.dashboard import dashboard_data, write_page

    meta = read_meta(config.dictionary)
    source = DictionaryFeatures(load_dictionary(config.dictionary), name=config.dictionary.name)
    store = ActivationStore(meta["store"])
    model = load_model(source.model or store.manifest["model"]["name"])
    latents = [int(v) for v in config.latents.split(",") if v.strip()]
    rows = None if config.all_rows else tuple(meta["held_out_rows"])
    scan = scan_features(source, store, rows=rows, n=config.n, latents=latents)
    decoded = decoded_tokens(model, source.output_directions()[scan.latent_ids])
    for latent in scan.latent_ids.tolist():
        examples = scan.examples(latent, model.tokenizer)
        i = scan.index_of(latent)
        promotes = "" if decoded is None else f"  promotes {[model.to_string([t]) for t in decoded['promoted'][i][:5]]}"
        typer.echo(f"\nlatent {latent}  density {scan.density[i]:.2%}{promotes}")
        if not examples.empty:
            with pd.option_context("display.width", 160, "display.max_colwidth", 60):
                typer.echo(examples[["activation", "left", "token", "right"]].to_string(index=False))
    data = dashboard_data(source, scan, model.tokenizer, decoded, store=store, left=24, right=8)
    page = write_page(config.out or config.dictionary / "features.html", data)
    typer.echo(f"\nwrote {page}")


@dataclass
class DashboardConfig:
    dictionary: Path = opt(help="a dictionary folder, or a training run's folder (one page per dictionary in it)", argument=True)
    store: Path | None = opt(None, "activation store to read (default: the one the dictionary was trained on)")
    out: Path = opt(Path("runs/dashboard"), "folder for the pages (<dictionary name>.html; index.html for several)")
    tokens: int | None = opt(200_000, "store rows to read: the last N (where training keeps its held-out rows); "
                                      "0 = the dictionary's held-out rows", parse=parse_count)
    n: int = opt(20, "top-activating contexts per latent")
    model: str | None = opt(None, "model for tokens and the unembedding (default: the one the dictionary or its store names)")


@command(DashboardConfig, "dashboard")
def dashboard_cmd(config: DashboardConfig) -> None:
    """Feature dashboard: a static HTML page per dictionary (density, histograms, top contexts, decoded tokens, search)."""
    from interp.viz.dashboard import dashboard_from_folder

    from interp.models import load_model

    model = load_model(config.model) if config.model else None
    pages = dashboard_from_folder(config.dictionary, config.out, store=config.store, tokens=config.tokens or None, n=config.n,
                                  model=model)
    for page in pages:
        typer.echo(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB)")


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


@dataclass
class ExperimentRunConfig:
    file: Path = opt(help="an experiment file, e.g. experiments/sae_pareto.toml", argument=True)
    smoke: bool = opt(False, "use the file's [smoke] sizes: a quick check that everything runs (what CI does)")
    out: Path | None = opt(None, "results folder (default: runs/experiments/<file name>[-smoke])")


@command(ExperimentRunConfig, "run", experiment_app)
def experiment_run_cmd(config: ExperimentRunConfig) -> None:
    """Run one experiment file: writes config.json, metrics.json and figures (HTML + PNG) to its results folder."""
    from interp.experiments import run_experiment

    out = run_experiment(config.file, smoke=config.smoke, out=config.out)
    metrics = json.loads((out / "metrics.json").read_text())
    for name, problem in metrics.get("png_problems", {}).items():
        typer.secho(f"warning: {name}.png not written: {problem}", fg="yellow", err=True)
    typer.echo(f"wrote {out}/config.json, metrics.json and figures/")


@dataclass
class ExperimentListConfig:
    pass


@command(ExperimentListConfig, "kinds", experiment_app)
def experiment_kinds_cmd(_config: ExperimentListConfig) -> None:
    """List the registered experiment kinds and their parameters."""
    from interp.experiments import kinds

    for kind in kinds().values():
        names = ", ".join(f.name for f in dataclasses.fields(kind.params))
        typer.echo(f"{kind.name:22s} {kind.doc.splitlines()[0] if kind.doc else ''}\n{'':22s} params: {names}")


@dataclass
class LensShowConfig:
    prompt: str = opt(help="text to read", argument=True)
    lens: str = opt("logit", "logit, tuned or linear")
    lens_path: Path | None = opt(None, "a lens folder from `interp lens train` (default for tuned/linear: runs/lens-<kind>/lens)")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    site: str | None = opt(None, "residual kind (resid_pre, resid_mid, resid_post); default resid_post, or the lens's own sites")
    norm: str = opt("recompute", "final norm scale: recompute (per layer) or frozen (the last layer's)")
    token: str | None = opt(None, "a token to follow (probability and rank per layer), e.g. ' Paris'")
    top_k: int = opt(5, "top tokens kept per cell")
    html: Path | None = opt(None, "write the figures (top token per layer and position, KL per layer, the token's rank) here")


@command(LensShowConfig, "show", lens_app)
def lens_show_cmd(config: LensShowConfig) -> None:
    """Read every layer's residual stream through the readout: top tokens per layer and position, KL to the output."""
    import pandas as pd

    from interp.lens import LENS_KINDS, AffineLens, logit_lens
    from interp.models import load_model
    from interp.viz.lens import kl_figure, write_figures

    if config.lens not in LENS_KINDS:
        raise InputError(f"--lens {config.lens!r}: choose one of {', '.join(LENS_KINDS)}")
    path = config.lens_path or Path(f"runs/lens-{config.lens}/lens")
    model = load_model(config.model)
    lens = None if config.lens == "logit" else AffineLens.load(path, model)
    if lens is not None and lens.kind != config.lens:
        raise InputError(f"{path} holds a {lens.kind} lens, not a {config.lens} lens")
    result = logit_lens(model, config.prompt, site=config.site, lens=lens, norm=config.norm, top_k=config.top_k, tokens=config.token)
    grid = result.table.pivot(index="layer", columns="position", values="top_tokens").map(lambda t: repr(t[0])[1:-1])
    grid.columns = [f"{p}:{result.str_tokens[0][p]!r}"[:14] for p in grid.columns]
    last = result.table[result.table.position == result.table.position.max()].set_index("layer")
    grid["KL(last)"] = last["kl"].round(3)
    if config.token:
        tracked = result.tokens[result.tokens.position == result.tokens.position.max()].set_index("layer")
        grid[f"p({config.token!r})"] = tracked["prob"].round(4)
        grid["rank"] = tracked["rank"]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        typer.echo(f"{result.lens} lens, {config.norm} norm scale; top token per layer (rows) and position (columns):")
        typer.echo(grid.iloc[:, -12:].to_string())
    if config.html:
        figures = [result.figure(), kl_figure(result.table[result.table.position == result.table.position.max()]
                                              .assign(lens=result.lens), "KL(final || lens) per layer at the last position")]
        if config.token:
            figures.append(result.token_figure())
        write_figures(config.html, figures, f"{result.lens} lens: {config.prompt}")
        typer.echo(f"wrote {config.html}")


from interp.lens.train import LensTrainConfig  # noqa: E402


@command(LensTrainConfig, "train", lens_app)
def lens_train_cmd(config: LensTrainConfig) -> None:
    """Train a tuned lens (KL, from the store) or fit a linear-map lens (least squares); report held-out KL per layer."""
    from interp.lens import fit_linear_lens, held_out_report, train_tuned_lens
    from interp.models import load_model
    from interp.viz.lens import kl_figure, write_figures

    model = load_model(config.model)
    lens = (train_tuned_lens if config.lens == "tuned" else fit_linear_lens)(config, model=model)
    table = held_out_report(config, lens, model=model)
    wide = table.pivot(index="layer", columns="lens", values="kl")
    typer.echo(f"held-out KL(final || lens) per layer, nats ({int(table.tokens.iloc[0]):,} tokens):")
    typer.echo(wide.round(4).to_string())
    write_figures(config.out / "kl.html", [kl_figure(table)], f"{config.lens} lens")
    typer.echo(f"trained in {lens.meta['train_seconds']:.1f} s; wrote {config.out}/lens, metrics.json, kl.html")


@dataclass
class DLAConfig:
    task: str = opt("ioi", "ioi, factual, or prompt (with --prompt, --answer and optionally --wrong)")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    n: int = opt(16, "task prompts")
    template: int = opt(0, "ioi: which template")
    seed: int = opt(0, "seed for the task prompts")
    prompt: str | None = opt(None, "task=prompt: the text")
    answer: str | None = opt(None, "task=prompt: the token whose logit to attribute, e.g. ' Paris'")
    wrong: str | None = opt(None, "task=prompt: subtract this token's logit")
    dictionary: Path | None = opt(None, "a trained SAE / transcoder folder: split its site into latents")
    top: int = opt(10, "heads and latents to print")
    out: Path = opt(Path("runs/dla"), "folder for config.json, components.csv and dla.html")


@command(DLAConfig, "dla")
def dla_cmd(config: DLAConfig) -> None:
    """Direct logit attribution: embeddings, every head and every MLP's contribution to a logit difference."""
    from interp.dla import direct_logit_attribution, dla_task
    from interp.models import load_model
    from interp.patching import TASKS
    from interp.viz.lens import write_figures

    if config.task not in (*TASKS, "prompt"):
        raise InputError(f"--task {config.task!r}: choose one of {', '.join(TASKS)}, prompt")
    if config.task == "prompt" and not (config.prompt and config.answer):
        raise InputError("--task prompt needs --prompt and --answer (and optionally --wrong)")
    dictionary = None
    if config.dictionary is not None:
        from interp.dictionary.io import load_dictionary

        dictionary = load_dictionary(config.dictionary)
    model = load_model(config.model)
    if config.task == "prompt":
        result = direct_logit_attribution(model, config.prompt, config.answer, config.wrong, dictionary=dictionary)
    else:
        kwargs = {"template": config.template} if config.task == "ioi" else {}
        task = TASKS[config.task](model, config.n, seed=config.seed, **kwargs)
        typer.echo(task.summary())
        result = dla_task(model, task, dictionary=dictionary)
    typer.echo(result.summary())
    typer.echo(result.top_heads(config.top)[["component", "mean", "std"]].to_string(index=False))
    mlps = result.table[result.table.kind == "mlp"]
    typer.echo(mlps.reindex(mlps["mean"].abs().sort_values(ascending=False).index).head(5)[["component", "mean", "std"]].to_string(index=False))
    if not result.latents.empty:
        typer.echo(result.latents.head(config.top).to_string(index=False))
    write_config(config, config.out)
    atomic_write(config.out / "components.csv", lambda tmp: result.table.to_csv(tmp, index=False))
    write_figures(config.out / "dla.html", [result.figure()], "direct logit attribution")
    typer.echo(f"wrote {config.out}/components.csv and dla.html")


@dataclass
class NeuronsDecodeConfig:
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    layers: str = opt("all", "all, 12, 0,5,29 or 10-20")
    variant: str = opt("raw", "raw, final_gain (the final norm's gain) or input_gain (the MLP's own input-norm gain)")
    weights: str = opt("gate,up,down", "which neuron vectors: gate and up (input rows), down (output column)")
    k: int = opt(10, "top and bottom tokens per vector")
    compute_dtype: str = opt("auto", "auto (bfloat16 screen + exact float32 rescoring where native), float32")
    out: Path = opt(Path("runs/neurons"), "folder for neurons.parquet, neurons.html and config.json")


@command(NeuronsDecodeConfig, "decode", neurons_app)
def neurons_decode_cmd(config: NeuronsDecodeConfig) -> None:
    """Decode every MLP neuron's input rows and output column through the unembedding: parquet + searchable HTML."""
    import time

    from interp.models import load_model
    from interp.neurons import decode_neurons, write_neuron_table

    model = load_model(config.model)
    started = time.perf_counter()
    table = decode_neurons(model, parse_layers(config.layers, model.cfg.n_layers), weights=[w.strip() for w in config.weights.split(",")],
                           variant=config.variant, k=config.k, compute_dtype=config.compute_dtype)
    seconds = time.perf_counter() - started
    write_config(config, config.out)
    parquet, page = write_neuron_table(table, config.out, title=f"{model.cfg.name}: neurons decoded ({config.variant})")
    sample = table.sample(min(8, len(table)), random_state=0)
    typer.echo(sample.assign(top=[" ".join(repr(t) for t in row[:5]) for row in sample.top_tokens])[["layer", "neuron", "weight", "top"]]
               .to_string(index=False))
    typer.echo(f"decoded {len(table):,} vectors in {seconds:.1f} s; wrote {parquet} and {page}")


@dataclass
class NeuronsClampConfig:
    layer: int = opt(help="layer of the neuron")
    neuron: int = opt(help="neuron index in the MLP hidden layer")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id")
    value: float | None = opt(None, "clamp to this value (default: --scale times the neuron's largest activation)")
    scale: float = opt(4.0, "without --value: multiple of the neuron's largest activation on 2,048 corpus tokens")
    token: str | None = opt(None, "token to measure (default: the top token of the neuron's output column, final-norm gain)")
    prompts: str | None = opt(None, "prompts separated by '|' (default: the test prompts of data/prompts.json)")
    max_new_tokens: int = opt(24, "greedy tokens generated per prompt")
    out: Path | None = opt(None, "folder for config.json and clamp.json")


@command(NeuronsClampConfig, "clamp", neurons_app)
def neurons_clamp_cmd(config: NeuronsClampConfig) -> None:
    """Clamp one MLP neuron during generation and measure the probability of its decoded token."""
    from interp.models import load_model
    from interp.neurons import clamp_effect, corpus_max_activation, default_prompts

    model = load_model(config.model)
    prompts = [p for p in config.prompts.split("|") if p.strip()] if config.prompts else default_prompts("test")
    value = config.value
    if value is None:
        peak = corpus_max_activation(model, config.layer, config.neuron)
        value = config.scale * peak
        typer.echo(f"largest activation on the corpus sample: {peak:.3f}; clamping to {value:.3f}")
    result = clamp_effect(model, config.layer, config.neuron, value, prompts, token=config.token, max_new_tokens=config.max_new_tokens)
    summary = result.summary()
    typer.echo(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in summary.items()))
    for row in result.generations.head(4).itertuples():
        typer.echo(f"{row.prompt!r}\n  clean:   {row.clean!r}\n  clamped: {row.clamped!r}")
    if config.out:
        write_config(config, config.out)
        write_json(config.out / "clamp.json", {**summary, "generations": result.generations.to_dict("records")})
        typer.echo(f"wrote {config.out}/clamp.json")


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


from interp.snmf.job import SNMFJobConfig  # noqa: E402


@command(SNMFJobConfig, "snmf")
def snmf_cmd(config: SNMFJobConfig) -> None:
    """Factorise a layer's MLP activations with SNMF (recursively for --k 400,100,25): held-out error, feature table and page."""
    from interp.snmf.job import run_snmf

    run_snmf(config)


def main() -> None:
    app()
