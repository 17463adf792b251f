"""Linear probes: logistic regression and difference-in-means, per site and layer.

    concept = interp.data.concepts.load_concept("sentiment")
    result = train_probes(model, concept, "blocks.*.hook_resid_post")   # every layer, one forward per batch
    result.table          # held-out accuracy and AUROC per site, layer and method
    result.plot()         # plotly line plot over layers
    result.probe("blocks.12.hook_resid_post", "logistic").direction   # unit vector, for steering / ablation

Features come from a live model run (``concept_activations``: the last token, or the mean over
tokens, of each text) or from an activation store (``train_probes_from_store``, one row per
token, labels per row, held-out contexts). A probe scores ``x @ weight + bias`` in the site's
own coordinates (> 0: concept present), so ``weight`` is a direction of the activation space.

Logistic regression is scikit-learn's (L-BFGS, L2 penalty ``C``) on centred features scaled by
one number (their RMS), so the penalty treats every direction of the space alike and the
direction returned is not distorted per dimension. Difference-in-means: ``weight`` = mean of the
positives minus mean of the negatives, threshold halfway between the class means.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from interp.data.concepts import Concept
from interp.errors import InputError
from interp.paths import atomic_write, write_json

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from interp.models.model import Model, SiteSpec
    from interp.store import ActivationStore

METHODS = ("logistic", "diff-means")
REDUCTIONS = ("last", "mean")
MIN_PROBE_PER_CLASS = 8  # so that a 25% held-out split still has two of each class
Reduce = Literal["last", "mean"]


@dataclass
class Probe:
    """A linear probe at ``site``: score(x) = x @ weight + bias, > 0 means the concept is present."""

    site: str
    method: str
    weight: torch.Tensor  # [d], float32
    bias: float
    reduce: str = "last"
    metrics: dict[str, float] = field(default_factory=dict)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.to(x.device) + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > 0

    @property
    def direction(self) -> torch.Tensor:
        """Unit vector along ``weight`` (pointing towards the concept)."""
        return self.weight / self.weight.norm().clamp_min(1e-12)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"probe method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def fit_probe(x: torch.Tensor, y: torch.Tensor | np.ndarray | Sequence[int], method: str = "logistic", *,
              site: str = "", reduce: str = "last", C: float = 1.0, max_iter: int = 2000) -> Probe:
    """Fit a probe on activations ``x`` [n, d] with labels ``y`` (1 / 0)."""
    check_method(method)
    x = x.detach().float().cpu()
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if x.ndim != 2 or x.shape[0] != labels.shape[0]:
        raise InputError(f"fit_probe: x must be [n, d] with one label per row (got {tuple(x.shape)} and {labels.shape[0]} labels)")
    if not torch.isfinite(x).all():
        raise InputError(f"fit_probe at {site or 'x'}: the activations contain NaN or inf")
    counts = [int((labels == c).sum()) for c in (1, 0)]
    if min(counts) == 0:
        raise InputError(f"fit_probe at {site or 'x'}: needs examples of both classes (got {counts[0]} positive, {counts[1]} negative)")
    pos_mean, neg_mean = x[labels == 1].mean(0), x[labels == 0].mean(0)
    if method == "diff-means":
        weight = pos_mean - neg_mean
        bias = -float(weight @ (pos_mean + neg_mean) / 2)
        return Probe(site, method, weight, bias, reduce)
    from sklearn.linear_model import LogisticRegression

    center = x.mean(0)
    scale = float((x - center).pow(2).sum(1).mean().sqrt() / np.sqrt(x.shape[1])) or 1.0
    features = ((x - center) / scale).double().numpy()
    clf = LogisticRegression(C=C, max_iter=max_iter).fit(features, labels.numpy())
    coef = torch.from_numpy(clf.coef_[0]).float() / scale
    return Probe(site, method, coef, float(clf.intercept_[0]) - float(coef @ center), reduce)


def probe_metrics(probe: Probe, x: torch.Tensor, y: torch.Tensor | np.ndarray | Sequence[int]) -> dict[str, float]:
    """Accuracy and AUROC of ``probe`` on ``x`` [n, d] with labels ``y``."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(y)
    scores = probe.score(x).cpu().numpy()
    auroc = float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan")
    return {"accuracy": float(((scores > 0) == (labels == 1)).mean()), "auroc": auroc}


def concept_activations(model: Model, texts: Sequence[str], sites: SiteSpec, *, reduce: Reduce = "last",
                        batch_size: int = 32, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        progress: bool = False) -> dict[str, torch.Tensor]:
    """One vector per text and site: the last token's activation, or the mean over its tokens.

    All sites come from one forward pass per batch (stopping after the deepest). ``"mean"``
    leaves out each text's first token: in many models (SmolLM2 among them) it carries massive
    activations that have nothing to do with the text, and would dominate the mean.
    ``transform`` maps each token's activation first ([batch, pos, d] -> [batch, pos, k], e.g.
    an SAE's latent activations). Returns float32 tensors [n_texts, d or k] on the CPU.
    """
    if reduce not in REDUCTIONS:
        raise InputError(f"reduce={reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    names = model.site_names(sites)
    for name in names:
        if model.site_table.info(name).pos_dim != 1:
            raise InputError(f"{name}: probes read [batch, pos, d] sites (residual stream, MLP, attention and norm outputs)")
    if not texts:
        raise InputError("no texts to read activations from")
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="activations", disable=not progress, leave=False):
        tokens = model.tokenize(list(texts[start : start + batch_size]), padding_side="right")
        cache = model.run_with_cache(tokens, names, dtype=torch.float32, device="cpu")
        real = tokens.real().cpu()
        lengths = real.sum(1)
        for name in names:
            act = cache[name] if transform is None else transform(cache[name]).float()
            if reduce == "last":
                out[name].append(act[torch.arange(act.shape[0]), lengths - 1])
            else:
                keep = real.clone()
                keep[:, 0] &= lengths == 1  # drop the first token unless it is the only one
                weights = keep.float().unsqueeze(-1)
                out[name].append((act * weights).sum(1) / weights.sum(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


@dataclass
class ProbeResults:
    """Probes per site and method with their train / held-out metrics."""

    table: pd.DataFrame
    probes: dict[tuple[str, str], Probe]
    concept: str = ""

    def probe(self, site: str, method: str = "logistic") -> Probe:
        if (site, method) not in self.probes:
            have = sorted({s for s, _ in self.probes}), sorted({m for _, m in self.probes})
            raise InputError(f"no {method} probe at {site}; sites: {', '.join(have[0])}; methods: {', '.join(have[1])}")
        return self.probes[(site, method)]

    def plot(self) -> go.Figure:
        """Held-out accuracy (solid) and AUROC (dotted) per layer, one colour per method and site kind."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for (method, kind), rows in self.table.groupby(["method", "kind"], sort=False):
            rows = rows.sort_values("layer")
            label = f"{method}" + (f" ({kind})" if self.table["kind"].nunique() > 1 else "")
            fig.add_scatter(x=rows["layer"], y=rows["test_accuracy"], mode="lines+markers", name=f"{label} accuracy")
            fig.add_scatter(x=rows["layer"], y=rows["test_auroc"], mode="lines", line={"dash": "dot"}, name=f"{label} AUROC")
        n_test = int(self.table["n_test"].iloc[0]) if len(self.table) else 0
        fig.update_layout(title=f"Probes for {self.concept or 'the concept'}: held-out accuracy per layer ({n_test} held-out examples)",
                          xaxis_title="layer", yaxis_title="held-out accuracy / AUROC",
                          template="plotly_white")
        return fig

    def save(self, folder: str | Path) -> Path:
        """``table.csv``, ``accuracy.html`` (plotly.min.js beside it, works offline), ``probes.safetensors`` + ``probes.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "table.csv", lambda tmp: self.table.to_csv(tmp, index=False))
        atomic_write(folder / "accuracy.html", lambda tmp: self.plot().write_html(tmp, include_plotlyjs="directory"))
        save_probes(list(self.probes.values()), folder / "probes.safetensors")
        return folder


def save_probes(probes: Sequence[Probe], path: str | Path) -> None:
    """Weights in ``path`` (safetensors, keyed ``site/method``), everything else in ``<path>.json``."""
    path = Path(path)
    atomic_write(path, lambda tmp: save_file({f"{p.site}/{p.method}": p.weight.contiguous() for p in probes}, str(tmp)))
    meta = [{"site": p.site, "method": p.method, "bias": p.bias, "reduce": p.reduce, "metrics": p.metrics} for p in probes]
    write_json(path.with_suffix(".json"), meta)


def load_probes(path: str | Path) -> list[Probe]:
    path = Path(path)
    weights = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    return [Probe(m["site"], m["method"], weights[f"{m['site']}/{m['method']}"], m["bias"], m["reduce"], m["metrics"]) for m in meta]


def train_probes(model: Model, concept: Concept, sites: SiteSpec = "blocks.*.hook_resid_post", *,
                 methods: Sequence[str] = METHODS, reduce: Reduce = "last", test_fraction: float = 0.25,
                 seed: int = 0, C: float = 1.0, batch_size: int = 32, progress: bool = True) -> ProbeResults:
    """Probes on ``concept``'s texts at every site in ``sites``, evaluated on held-out texts.

    The split is the concept file's own (``"split"`` fields) or a seeded stratified one.
    """
    for method in methods:
        check_method(method)
    concept.check(MIN_PROBE_PER_CLASS, "a probe")
    names = model.site_names(sites)  # validate before the forward passes
    train, test = concept.split(test_fraction, seed)
    acts = concept_activations(model, concept.texts, names, reduce=reduce, batch_size=batch_size, progress=progress)
    y = np.asarray(concept.labels)
    features = {name: (x[train], x[test]) for name, x in acts.items()}
    return _fit_all(model, features, y[train], y[test], methods, reduce, C, concept.name, progress)


def train_probes_from_store(store: ActivationStore, sites: Sequence[str], labels: np.ndarray | Sequence[int], *,
                            rows: np.ndarray | None = None, methods: Sequence[str] = METHODS, test_fraction: float = 0.25,
                            seed: int = 0, C: float = 1.0, concept: str = "", progress: bool = True) -> ProbeResults:
    """Token-level probes on store rows: ``labels`` (1 / 0) for each row in ``rows`` (default: every row).

    Whole contexts are held out (a ``test_fraction`` of them, seeded), so no held-out token
    shares a context with a training token.
    """
    for method in methods:
        check_method(method)
    rows = np.arange(store.n_rows) if rows is None else np.sort(np.asarray(rows))
    y = np.asarray(labels)
    if y.shape != rows.shape:
        raise InputError(f"{len(y)} labels for {len(rows)} rows: give one label per row")
    contexts = store.rows(rows)[:, 0]
    unique = np.unique(contexts)
    held = np.random.default_rng(seed).permutation(unique)[: max(1, round(test_fraction * len(unique)))]
    is_test = np.isin(contexts, held)
    for name, part in (("training", y[~is_test]), ("held-out", y[is_test])):
        if min(int((part == 1).sum()), int((part == 0).sum())) == 0:
            raise InputError(f"the {name} rows hold only one class; label more rows of each class")
    features = {site: (store.read(site, rows[~is_test]), store.read(site, rows[is_test])) for site in sites}
    return _fit_all(None, features, y[~is_test], y[is_test], methods, "token", C, concept, progress)


def _fit_all(model: Model | None, features: dict[str, tuple[torch.Tensor, torch.Tensor]], y_train: np.ndarray,
             y_test: np.ndarray, methods: Sequence[str], reduce: str, C: float, concept: str, progress: bool) -> ProbeResults:
    records: list[dict[str, Any]] = []
    probes: dict[tuple[str, str], Probe] = {}
    for site, (x_train, x_test) in tqdm(features.items(), desc="probes", disable=not progress, leave=False):
        layer, kind = _layer_and_kind(model, site)
        for method in methods:
            probe = fit_probe(x_train, y_train, method, site=site, reduce=reduce, C=C)
            train_m, test_m = probe_metrics(probe, x_train, y_train), probe_metrics(probe, x_test, y_test)
            probe.metrics = {"train_accuracy": train_m["accuracy"], "test_accuracy": test_m["accuracy"], "test_auroc": test_m["auroc"]}
            probes[(site, method)] = probe
            records.append({"site": site, "layer": layer, "kind": kind, "method": method, **probe.metrics,
                            "n_train": len(y_train), "n_test": len(y_test)})
    return ProbeResults(pd.DataFrame.from_records(records), probes, concept)


def _layer_and_kind(model: Model | None, site: str) -> tuple[int, str]:
    if model is not None:
        info = model.site_table.info(site)
        return (info.layer if info.layer is not None else -1), info.kind
    match = re.match(r"blocks\.(\d+)\.(.+)", site)
    return (int(match.group(1)), match.group(2)) if match else (-1, site)
