"""Config-driven experiments: one TOML file per headline comparison, one results folder per run.

An experiment file names a registered ``kind`` and its parameters, and optionally smaller ones
for a quick check (``[smoke]``, what CI runs)::

    kind = "sae_pareto"
    description = "TopK SAEs over k: FVU, CE recovered and dead fraction against L0"

    [params]
    layer = 6
    ks = [8, 16, 32, 64, 128]

    [smoke]
    tokens = "8k"

``interp experiment run FILE [--smoke] [--out DIR]`` writes ``DIR/config.json`` (the resolved
parameters), ``DIR/metrics.json`` (what the kind returns) and ``DIR/figures/NAME.html`` + ``.png``.

A new kind is a module in this package that decorates its run function with
``@register("name", ParamsDataclass)``; modules here are discovered on first use, so nothing
else needs editing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import subprocess
import time
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.errors import InputError
from interp.experiments.results import Results


@dataclass
class ExperimentKind:
    name: str
    params: type
    run: Callable[[Any, Results], dict[str, Any]]
    doc: str


KINDS: dict[str, ExperimentKind] = {}


def register(name: str, params: type) -> Callable[[Callable[[Any, Results], dict[str, Any]]], Callable[[Any, Results], dict[str, Any]]]:
    """Register ``run(params, results) -> metrics`` as experiment kind ``name``."""

    def decorate(run: Callable[[Any, Results], dict[str, Any]]) -> Callable[[Any, Results], dict[str, Any]]:
        KINDS[name] = ExperimentKind(name, params, run, (run.__doc__ or "").strip())
        return run

    return decorate


def kinds() -> dict[str, ExperimentKind]:
    """Every registered kind (importing each module of this package once)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return KINDS


@dataclass
class Spec:
    """A parsed experiment file: its kind, resolved parameters and where it came from."""

    path: Path
    kind: ExperimentKind
    params: Any
    smoke: bool
    description: str


def load_spec(path: str | Path, *, smoke: bool = False) -> Spec:
    """Read and check an experiment file (unknown kinds or parameters fail here, before any work)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise InputError(f"cannot read experiment file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path} is not valid TOML: {err}") from None
    extra = set(raw) - {"kind", "description", "params", "smoke"}
    if extra:
        raise InputError(f"{path}: unknown top-level keys {sorted(extra)}; allowed: kind, description, [params], [smoke]")
    available = kinds()
    name = raw.get("kind")
    if name not in available:
        raise InputError(f"{path}: kind {name!r} is not registered; registered kinds: {', '.join(sorted(available))}")
    kind = available[name]
    values = dict(raw.get("params", {}))
    if smoke:
        values.update(raw.get("smoke", {}))
    return Spec(path, kind, make_params(kind.params, values, where=str(path)), smoke, raw.get("description", ""))


def make_params(cls: type, values: dict[str, Any], *, where: str = "") -> Any:
    """``cls(**values)`` with a clear error for unknown names and wrongly typed values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown parameters {unknown}; {cls.__name__} takes {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise InputError(f"{where}: parameter {key}={value!r} should be of type {hints[key]}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"{where}: missing parameters {missing}")
    return cls(**values)


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value) if args else isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) if isinstance(hint, type) else True


def run_experiment(path: str | Path, *, smoke: bool = False, out: str | Path | None = None) -> Path:
    """Run one experiment file; returns its results folder."""
    spec = load_spec(path, smoke=smoke)
    out = Path(out) if out else Path("runs") / "experiments" / (spec.path.stem + ("-smoke" if smoke else ""))
    results = Results(out)
    record = {"kind": spec.kind.name, "file": str(spec.path), "description": spec.description, "smoke": smoke,
              "params": json.loads(json.dumps(dataclasses.asdict(spec.params), default=str)),
              "commit": _git_commit(spec.path.parent), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results.write_json("config.json", record)
    start = time.perf_counter()
    metrics = spec.kind.run(spec.params, results)
    results.write_json("config.json", {**record, "seconds": time.perf_counter() - start})
    results.write_json("metrics.json", {**metrics, **results.figure_problems()})
    return out


def _git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


__all__ = ["KINDS", "ExperimentKind", "Results", "Spec", "kinds", "load_spec", "make_params", "register", "run_experiment"]
