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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import typer

from interp.errors import InterpError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="interp: a mechanistic-interpretability workbench")
C = TypeVar("C")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, argument: bool = False, parse: Callable[[str], Any] | None = None) -> Any:
    """A config field with CLI help. ``parse`` turns the CLI text into the value (e.g. "2M")."""
    meta = {"help": help, "argument": argument, "parse": parse}
    return field(default=default, metadata=meta)


def parse_count(text: str | int) -> int:
    """'2M' -> 2_000_000, '500k' -> 500_000, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    clean = text.strip().lower().replace("_", "")
    try:
        if clean and clean[-1] in units:
            return int(float(clean[:-1]) * units[clean[-1]])
        return int(clean)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a count (examples: 4096, 500k, 2M)") from None


def write_config(config: Any, out: Path) -> None:
    """Write the resolved config of a run as ``out/config.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))


def command(config_cls: type[C], name: str) -> Callable[[Callable[[C], None]], Callable[[C], None]]:
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
            for f in dataclasses.fields(config_cls):
                parse = f.metadata.get("parse")
                if parse and kwargs.get(f.name) is not None:
                    kwargs[f.name] = parse(kwargs[f.name])
            try:
                run(config_cls(**kwargs))
            except InterpError as err:
                typer.secho(f"error: {err}", fg="red", err=True)
                raise typer.Exit(2) from None

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__doc__ = (run.__doc__ or "").strip()
        app.command(name)(wrapper)
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


def main() -> None:
    app()
