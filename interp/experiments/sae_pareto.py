"""SAE Pareto curve over k: FVU, CE loss recovered and dead fraction against L0.

interp trains one TopK SAE per k in lockstep from one read of the store (``interp train-sae
--k 8,16,...``); where EleutherAI sparsify is installed, it trains on exactly the same batches
(``sparsify_baseline``), and both are scored on the store's held-out rows by the same code
(reconstruction on every held-out row, spliced CE loss on whole held-out contexts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.config import config_dict
from interp.dictionary import checkpoint
from interp.errors import InputError
from interp.experiments import register
from interp.experiments.results import Results
from interp.paths import atomic_write

COLUMNS = ("l0", "fvu", "fvu_inliers", "ce_recovered", "delta_lm_loss", "kl", "dead_fraction", "cosine", "train_seconds")


@dataclass
class SaeParetoParams:
    model: str = "smollm2-135m"
    layer: int = 6
    site: str = "resid_post"
    latents: int = 8192
    ks: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    tokens: str = "400k"
    eval_tokens: str = "65536"
    eval_contexts: int = 32
    corpus: str = "shakespeare"
    store: str = ""  # "": the default store under the cache dir; a relative path lies inside the results folder
    batch_size: int = 4096
    seed: int = 0
    sparsify: bool = True


@register("sae_pareto", SaeParetoParams)
def run(params: SaeParetoParams, results: Results) -> dict[str, Any]:
    """TopK SAEs over k (interp, and sparsify on the same batches where installed): FVU, CE recovered, dead vs L0."""
    from interp.dictionary.train import TrainConfig, Trainer, dictionary_metrics, held_out_contexts

    store = None if not params.store else Path(params.store) if Path(params.store).is_absolute() else results.root / params.store
    config = TrainConfig(model=params.model, layer=params.layer, site=params.site, k=",".join(map(str, params.ks)),
                         latents=params.latents, tokens=params.tokens, eval_tokens=params.eval_tokens,
                         eval_contexts=params.eval_contexts, corpus=params.corpus, store=store, out=results.root / "interp",
                         batch_size=params.batch_size, seed=params.seed)
    trainer = Trainer(config)
    # A finished or interrupted sweep in this folder is reused only with the settings it was run with.
    settings = {k: v for k, v in config_dict(config).items() if k != "resume"}
    done = config.out / "metrics.json"
    if done.exists():  # the sweep finished in an earlier run of this experiment
        saved = json.loads((config.out / "config.json").read_text())
        differ = sorted(k for k in settings if saved.get(k) != settings[k])
        if differ:
            raise InputError(f"{config.out} holds a sweep run with other settings ({', '.join(differ)} differ); "
                             "give the experiment another results folder or delete that one")
        ours = json.loads(done.read_text())
    else:
        if checkpoint.exists(config.out):  # interrupted: continue where it stopped (refused if settings differ)
            trainer.load_checkpoint()
        ours = trainer.run()
    table = [{"method": "interp", "k": k, **_pick(ours[name])} for k, name in zip(params.ks, ours, strict=True)]
    kept_lr = {k: ours[name].get("lr") for k, name in zip(params.ks, ours, strict=True)}  # sparsify trains at interp's rate

    theirs: dict[str, Any] = {}
    skipped = _sparsify_problem(params)
    if skipped is None:
        from interp.experiments.sparsify_baseline import train_sparsify

        held_out = (trainer.train_rows[1], trainer.store.n_rows)
        contexts = held_out_contexts(trainer.store, held_out, params.eval_contexts, trainer.model.tokenizer)
        for k in params.ks:
            path = results.path("sparsify", f"k{k}.json")
            piece = {**settings, "auxk_dead": trainer.auxk_dead, "lr": kept_lr[k]}  # what a sparsify run depends on
            cached = json.loads(path.read_text()) if path.exists() else {}
            if cached.get("settings") == piece:
                theirs[str(k)] = cached
            else:  # not run yet, or run with other settings: (re)train
                dictionary, stats = train_sparsify(trainer, k, kept_lr[k])
                theirs[str(k)] = {**stats, **dictionary_metrics(dictionary, trainer.store, held_out, trainer.model, contexts),
                                  "settings": piece}
                results.write_json(f"sparsify/k{k}.json", theirs[str(k)])
            table.append({"method": "sparsify", "k": k, **_pick(theirs[str(k)])})

    import pandas as pd

    frame = pd.DataFrame(table)
    atomic_write(results.path("pareto.csv"), lambda tmp: frame.to_csv(tmp, index=False))
    results.figure("pareto", pareto_figure(frame, title=f"TopK SAEs on {trainer.in_site}, {params.latents} latents, "
                                                       f"{trainer.steps * params.batch_size:,} tokens"), height=430)
    return {"site": trainer.in_site, "store": str(trainer.store.root), "train_rows": list(trainer.train_rows),
            "held_out_rows": [trainer.train_rows[1], trainer.store.n_rows], "table": table,
            "interp": ours, "sparsify": theirs if skipped is None else {"skipped": skipped}}


def _sparsify_problem(params: SaeParetoParams) -> str | None:
    if not params.sparsify:
        return "sparsify = false in the experiment file"
    from interp.experiments.sparsify_baseline import sparsify_available

    return sparsify_available()


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: metrics.get(key, float("nan")) for key in COLUMNS}


def pareto_figure(frame: Any, *, title: str) -> Any:
    """Three panels against L0 (log scale): FVU, CE loss recovered, dead fraction; one line per method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [("fvu", "FVU (lower is better)"), ("ce_recovered", "CE loss recovered"), ("dead_fraction", "dead fraction")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[label for _, label in panels], horizontal_spacing=0.08)
    colours = {"interp": "#1f77b4", "sparsify": "#ff7f0e"}
    for col, (metric, _) in enumerate(panels, start=1):
        for method, rows in frame.groupby("method", sort=False):
            rows = rows.sort_values("l0")
            fig.add_trace(go.Scatter(x=rows.l0, y=rows[metric], mode="lines+markers+text", name=method,
                                     text=[f"k={k}" for k in rows.k], textposition="top center", textfont={"size": 9},
                                     line={"color": colours.get(method)}, legendgroup=method, showlegend=col == 1),
                          row=1, col=col)
        fig.update_xaxes(title_text="L0", type="log", row=1, col=col)
    fig.update_layout(title=title, height=430, margin={"t": 80})
    return fig
