"""A strength sweep: every vector at every strength on the same prompts, scored and plotted.

``sweep(model, {"diff-means": v1, "probe": v2}, [2, 4, 8], prompts, scorer=VaderScorer(), out=DIR)``
generates once without steering and once per (vector, strength), scores every continuation
(concept score, NLL under the unsteered model, distinct bigrams) and returns a ``SweepResult``:
a table per (method, strength), all generations, side-by-side views and a plotly figure.

With ``out``, each (method, strength) run is written to ``out/generations/`` as soon as it is
done, and a sweep run again with the same settings skips the runs already there (settings that
differ are refused, so results are never mixed).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.paths import atomic_write, write_json, write_text
from interp.steering.evaluation import Scorer, continuation_nll, distinct_n
from interp.steering.generation import POSITIONS, Edit, Generations, Positions, Steering, generate
from interp.steering.lineas import AffineMaps, check_lambda
from interp.steering.vectors import UNITS, SteeringVector, Units, check_strength

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from interp.models.model import Model

UNSTEERED = "unsteered"
SETTINGS = "sweep.json"


@dataclass
class SweepResult:
    """``table``: one row per (method, strength); ``generations``: one row per continuation."""

    table: pd.DataFrame
    generations: pd.DataFrame
    score_name: str = "score"
    notes: list[str] = field(default_factory=list)  # how the vectors were made (printed by the CLI)

    def side_by_side(self, method: str | None = None, prompts: Sequence[int] | None = None) -> pd.DataFrame:
        """Prompt, unsteered continuation, and one column per strength of ``method`` (default: the first)."""
        g = self.generations
        methods = [m for m in g["method"].unique() if m != UNSTEERED]
        method = method or (methods[0] if methods else UNSTEERED)
        if method not in set(g["method"]):
            raise InputError(f"method {method!r} is not in this sweep (it has {', '.join(methods)})")
        rows = g[g["method"].isin([UNSTEERED, method])]
        rows = rows.sort_values("strength", kind="stable")
        rows = rows.assign(column=[UNSTEERED if m == UNSTEERED else f"{method} {s:g}" for m, s in zip(rows["method"], rows["strength"], strict=True)])
        wide = rows.pivot(index="prompt_index", columns="column", values="text")
        wide = wide[[UNSTEERED] + [c for c in rows["column"].unique() if c != UNSTEERED]].reset_index()
        wide.insert(1, "prompt", g.drop_duplicates("prompt_index").set_index("prompt_index").loc[wide["prompt_index"], "prompt"].to_numpy())
        return wide if prompts is None else wide[wide["prompt_index"].isin(list(prompts))]

    def plot(self) -> go.Figure:
        """Concept score and perplexity against strength, and score against perplexity, one line per method."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        t = self.table
        base = t[t["method"] == UNSTEERED]
        fig = make_subplots(rows=1, cols=3, subplot_titles=(f"{self.score_name} vs strength", "perplexity vs strength",
                                                             f"{self.score_name} vs perplexity"))
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
        for i, method in enumerate(m for m in t["method"].unique() if m != UNSTEERED):
            rows = pd.concat([base.assign(method=method), t[t["method"] == method]]).sort_values("strength")
            style = {"color": colours[i % len(colours)]}
            labels = [f"{s:g}" for s in rows["strength"]]
            common = dict(mode="lines+markers", name=method, legendgroup=method, line=style)
            fig.add_trace(go.Scatter(x=rows["strength"], y=rows["score"], error_y={"array": rows["score_sem"]}, **common), 1, 1)
            fig.add_trace(go.Scatter(x=rows["strength"], y=rows["perplexity"], showlegend=False, **common), 1, 2)
            fig.add_trace(go.Scatter(x=rows["perplexity"], y=rows["score"], text=labels, textposition="top center",
                                     showlegend=False, **{**common, "mode": "lines+markers+text"}), 1, 3)
        fig.update_xaxes(title_text="strength", row=1, col=1)
        fig.update_xaxes(title_text="strength", row=1, col=2)
        fig.update_yaxes(title_text="perplexity (unsteered model)", type="log", row=1, col=2)
        fig.update_xaxes(title_text="perplexity (unsteered model)", type="log", row=1, col=3)
        fig.update_yaxes(title_text=self.score_name, row=1, col=1)
        fig.update_yaxes(title_text=self.score_name, row=1, col=3)
        n = int(base["n"].iloc[0]) if len(base) else 0
        fig.update_layout(title=f"Steering sweep on {n} prompts (unsteered at strength 0)", template="plotly_white", height=460, width=1400)
        return fig

    def save(self, out: str | Path) -> Path:
        """``table.csv``, ``sweep.html`` (plotly.min.js beside it), ``generations.jsonl``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "table.csv", lambda tmp: self.table.to_csv(tmp, index=False))
        atomic_write(out / "sweep.html", lambda tmp: self.plot().write_html(tmp, include_plotlyjs="directory"))
        atomic_write(out / "generations.jsonl",
                     lambda tmp: self.generations.to_json(tmp, orient="records", lines=True, force_ascii=False))
        return out


def sweep(model: Model, vectors: Mapping[str, SteeringVector | AffineMaps], strengths: Sequence[float], prompts: Sequence[str], *,
          scorer: Scorer | None = None, units: Units = "norm", mean_norms: Mapping[str, float] | None = None,
          positions: Positions = "all", max_new_tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0,
          seed: int = 0, batch_size: int = 32, out: str | Path | None = None, progress: bool = True) -> SweepResult:
    """Generate, score and tabulate ``prompts`` unsteered and under each vector at each strength.

    ``mean_norms`` maps each vector's site to its mean activation norm (needed for ``units="norm"``).
    ``vectors`` may also hold LinEAS / AcT maps (``AffineMaps``), whose strength is the
    interpolation lambda in [0, 1] (``units`` do not apply to them).
    Strength 0 is the unsteered run (an added zero vector changes nothing), generated once.
    """
    strengths = sorted({check_strength(s) for s in strengths})
    if not vectors:
        raise InputError("no steering vectors to sweep")
    if units not in UNITS or positions not in POSITIONS:
        raise InputError(f"units must be one of {', '.join(UNITS)} and positions one of {', '.join(POSITIONS)}")
    if not prompts:
        raise InputError("no prompts to steer")
    if any(isinstance(v, AffineMaps) for v in vectors.values()):
        for s in strengths:
            check_lambda(s)
    norms = dict(mean_norms or {})
    if units == "norm":
        missing = sorted({v.site for v in vectors.values() if isinstance(v, SteeringVector)} - set(norms))
        if missing:
            raise InputError(f"units='norm' needs the mean activation norm of {', '.join(missing)} (mean_norms)")
    settings = {"prompts": list(prompts), "units": units, "positions": positions, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "batch_size": batch_size,
                "model": model.cfg.name, "mean_norms": norms, "scorer": getattr(scorer, "name", None),
                "vectors": {name: _vector_digest(v) for name, v in vectors.items()}}
    folder = _prepare(Path(out), settings) if out is not None else None
    runs = [(UNSTEERED, 0.0)] + [(name, s) for name in vectors for s in strengths if s != 0]
    records: list[dict[str, Any]] = []
    for method, strength in tqdm(runs, desc="sweep", disable=not progress):
        path = folder / f"{_safe(method)}@{strength:g}.jsonl" if folder is not None else None
        if path is not None and path.is_file():
            records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            continue
        edits: list[Edit] = []
        scale = 0.0
        v = vectors.get(method)
        if isinstance(v, AffineMaps):
            edits, scale = list(v.steering(strength, positions)), float("nan")
        elif v is not None:
            added = v.scaled(strength, units, norms.get(v.site))
            scale = float(added.norm())
            edits = [Steering(v.site, added, positions)]
        gens = generate(model, prompts, edits, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, batch_size=batch_size)
        run = _score(model, gens, scorer, batch_size)
        run = [{"method": method, "strength": strength, "added_norm": scale, **r} for r in run]
        if path is not None:
            write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run))
        records += run
    generations = pd.DataFrame.from_records(records)
    result = SweepResult(summarise(generations), generations, getattr(scorer, "description", "score"))
    if out is not None:
        result.save(out)
    return result


def summarise(generations: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, strength): mean score and its standard error, pooled perplexity, distinct bigrams."""
    rows = []
    for (method, strength), g in generations.groupby(["method", "strength"], sort=False):
        scores = g["score"].astype(float)
        tokens = float(g["tokens"].sum())
        rows.append({
            "method": method, "strength": strength, "added_norm": float(g["added_norm"].iloc[0]),
            "score": scores.mean(), "score_sem": scores.std(ddof=1) / math.sqrt(len(g)) if len(g) > 1 else float("nan"),
            "perplexity": math.exp(float(g["nll"].sum()) / tokens) if tokens else float("nan"),
            "distinct2": float(np.nanmean(g["distinct2"])) if g["distinct2"].notna().any() else float("nan"),
            "tokens": float(g["tokens"].mean()), "n": len(g),
        })
    return pd.DataFrame(rows)


def _score(model: Model, gens: Generations, scorer: Scorer | None, batch_size: int) -> list[dict[str, Any]]:
    scores = scorer(gens.texts) if scorer is not None else np.full(len(gens.texts), np.nan)
    nll, counts = continuation_nll(model, gens, batch_size=batch_size)
    return [{"prompt_index": i, "prompt": p, "text": t, "score": float(s), "nll": float(n), "tokens": int(c),
             "distinct2": distinct_n(t)}
            for i, (p, t, s, n, c) in enumerate(zip(gens.prompts, gens.texts, scores, nll, counts, strict=True))]


def _prepare(out: Path, settings: dict[str, Any]) -> Path:
    """Create ``out/generations``; refuse a folder that holds a sweep with other settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS
    merged = dict(settings)
    if path.is_file():  # strengths and new vectors may be added to a sweep; nothing else may change
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(settings) if k != "vectors" and not _same_setting(old.get(k), settings.get(k)))
        changed += [f"vector {name!r}" for name, digest in settings["vectors"].items() if old["vectors"].get(name, digest) != digest]
        if changed:
            raise InputError(f"{out} holds a sweep with other settings ({', '.join(changed)} differ); "
                             "use another output folder, or delete it to start over")
        merged["vectors"] = {**old["vectors"], **settings["vectors"]}
    write_json(path, merged)
    folder = out / "generations"
    folder.mkdir(exist_ok=True)
    return folder


def _same_setting(old: Any, new: Any) -> bool:
    """Equal, floats up to 1e-6 relative: a mean norm recomputed with another thread count differs in
    its last digits, and that must not stop a sweep from resuming."""
    if isinstance(old, float) and isinstance(new, float):
        return math.isclose(old, new, rel_tol=1e-6)
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_setting(old[k], new[k]) for k in old)
    return old == new


def _vector_digest(v: SteeringVector | AffineMaps) -> str:
    if isinstance(v, AffineMaps):
        return v.digest()
    return f"{v.site}:{v.source}:" + hashlib.sha256(v.vector.numpy().tobytes()).hexdigest()[:16]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
