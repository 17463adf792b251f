"""LinEAS: per-unit affine steering maps learned end to end with a distributional loss; and the
AcT baselines fitted with the same code.

    maps = fit_lineas(model, source_texts, target_texts, model.site_names("blocks.[0-7].hook_resid_post"))
    out = generate(model, prompts, maps.steering(0.5))        # strength lambda in [0, 1]
    maps.save("runs/lineas/maps.safetensors"); AffineMaps.load(...)

Every method gives an ``AffineMaps``: at each site a diagonal map ``x -> omega * x + b``. At
strength ``lambda`` the map is interpolated with the identity, ``x + lambda((omega - 1) x + b)``.

- ``fit_lineas`` (Rodriguez et al. 2025, "LinEAS"): all sites at once. The source texts run
  through the model with every map active; the loss is the sum over sites and units of the 1-D
  Wasserstein distance between the mapped source activations and the (unsteered) target
  activations, so the gradient of a map also flows through every later layer and map. After
  each Adam step a proximal step of the sparse group lasso on ``(omega - 1, b)`` (one group per
  unit), taken in Adam's metric (``prox_thresholds``), sets whole units back to the identity, so
  the fitted map touches few units. The blocks below the first map are run once, not every step.
- ``fit_act(kind="mean")`` (Mean-AcT): a per-unit shift, target mean minus source mean;
  ``fit_act(kind="linear")`` (Linear-AcT, Rodriguez et al. 2024): a per-unit affine transport,
  the least-squares line through the matched quantiles of source and target. Both fit layer by
  layer, in forward order, each on source activations with the earlier maps applied, with no
  gradient through the model.

Activations are pooled over every token of each text except the first (it carries the massive
activations of many models); source and target counts then differ, and ``quantile_pairs``
matches them exactly on the merged quantile grid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.faults import fault_point
from interp.intervene import Affine, Apply
from interp.models.hooks import StopForward
from interp.paths import atomic_write, write_json
from interp.steering.generation import AffineSteering, Positions

if TYPE_CHECKING:
    from interp.models.model import Model, Tokens

MIN_TEXTS = 4  # per side: fewer gives too few token values per unit for a distribution
METHODS = ("lineas", "mean-act", "linear-act")


def check_lambda(strength: float) -> float:
    value = float(strength)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise InputError(f"strength {strength!r} is outside [0, 1]: an affine map's strength interpolates between "
                         "the identity (0) and the fitted map (1)")
    return value


@dataclass
class AffineMaps:
    """A diagonal affine map ``x -> weight * x + bias`` per site (in forward order)."""

    method: str
    weight: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.weight) != set(self.bias) or not self.weight:
            raise InputError("an affine map needs a weight and a bias at every one of its sites (and at least one site)")
        for site in self.weight:
            w, b = self.weight[site], self.bias[site]
            if w.ndim != 1 or w.shape != b.shape:
                raise InputError(f"{site}: weight {tuple(w.shape)} and bias {tuple(b.shape)} must be equal [d] vectors")

    @property
    def sites(self) -> list[str]:
        return list(self.weight)

    def interventions(self, strength: float = 1.0) -> list[Affine]:
        """The maps at ``strength`` as interventions, for ``model.intervene``."""
        lam = check_lambda(strength)
        return [Affine(site, 1 + lam * (self.weight[site] - 1), lam * self.bias[site]) for site in self.sites]

    def steering(self, strength: float = 1.0, positions: Positions = "all") -> list[AffineSteering]:
        """The maps at ``strength`` as edits for ``interp.steering.generate`` and ``sweep``."""
        return [AffineSteering(iv.site, iv.weight, iv.bias, positions) for iv in self.interventions(strength)]

    def active_units(self) -> dict[str, int]:
        """Units per site whose map is not the identity."""
        return {s: int(((self.weight[s] != 1) | (self.bias[s] != 0)).sum()) for s in self.sites}

    def digest(self) -> str:
        h = hashlib.sha256(self.method.encode())
        for s in self.sites:
            h.update(s.encode() + self.weight[s].numpy().tobytes() + self.bias[s].numpy().tobytes())
        return f"{self.method}:" + h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """``path`` (safetensors: ``<site>.weight`` / ``<site>.bias``) and ``<path>.json`` (method, sites, info)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{s}.{k}": t[s].contiguous() for s in self.sites for k, t in (("weight", self.weight), ("bias", self.bias))}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        meta = {"method": self.method, "sites": self.sites, "active_units": self.active_units(), "info": self.info}
        write_json(path.with_suffix(".json"), meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AffineMaps:
        path = Path(path)
        if path.is_dir():
            path = path / "maps.safetensors"
        if not path.is_file():
            raise InputError(f"{path}: no such affine-map file (write one with `interp lineas fit`)")
        try:
            tensors = load_file(str(path))
            meta = json.loads(path.with_suffix(".json").read_text())
            weight = {s: tensors[f"{s}.weight"] for s in meta["sites"]}
            bias = {s: tensors[f"{s}.bias"] for s in meta["sites"]}
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"{path} is not an affine map written by AffineMaps.save ({err})") from None
        return cls(meta["method"], weight, bias, meta.get("info", {}))

    def check_model(self, model: Model) -> None:
        """Every site exists in ``model`` with the map's width."""
        for site in self.sites:
            info = model.site_table.info(model.site_table.check(site))
            if info.shape[-1] != self.weight[site].numel():
                raise InputError(f"{site}: the map has width {self.weight[site].numel()}, the model's site {info.shape[-1]}")


# ---------------------------------------------------------------- 1-D transport


def quantile_pairs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matched quantiles of ``x`` [n, d] and ``y`` [m, d], per column.

    Returns ``xq``, ``yq`` [K, d] and weights ``w`` [K] (summing to 1): on each piece of the merged
    grid of quantile levels {i/n} and {j/m}, the sorted value of each sample there. For n == m
    this is the sorted values paired one to one. Differentiable in x and y (through the sort).
    """
    n, m = x.shape[0], y.shape[0]
    xs, ys = x.sort(0).values, y.sort(0).values
    if n == m:
        return xs, ys, torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
    ix, iy, w = _merged_grid(n, m, x.device)
    return xs[ix], ys[iy], w.to(x.dtype)


def _merged_grid(n: int, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices into n and m sorted samples and the weights of the merged grid of levels {i/n} and {j/m}."""
    edges = torch.cat([torch.arange(n + 1) * m, torch.arange(m + 1) * n]).unique()  # levels times n*m: exact
    left = edges[:-1]
    w = (edges[1:] - left).double() / (n * m)
    return (left // m).to(device), (left // n).to(device), w.to(device)


def wasserstein_1d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-column 1-D Wasserstein-1 distance between samples ``x`` [n, d] and ``y`` [m, d] -> [d]."""
    if x.ndim == 1:
        return wasserstein_1d(x[:, None], y[:, None])[0]
    if x.shape[0] == 0 or y.shape[0] == 0 or x.shape[1:] != y.shape[1:]:
        raise InputError(f"wasserstein_1d needs non-empty samples of equal width (got {tuple(x.shape)} and {tuple(y.shape)})")
    xq, yq, w = quantile_pairs(x, y)
    return (w[:, None] * (xq - yq).abs()).sum(0)


def prox_sparse_group_lasso(groups: torch.Tensor, l1: float | torch.Tensor, group: float | torch.Tensor) -> torch.Tensor:
    """Proximal operator of ``l1 * |v|_1 + group * sum_j |v_j|_2`` for rows ``v_j`` of ``groups`` [units, k].

    Soft-threshold every entry by ``l1``, then shrink each row's norm by ``group``: a row whose
    norm (after the first step) is at most ``group`` becomes exactly zero. The thresholds may be
    numbers or tensors broadcasting against ``groups`` (per entry) and [units, 1] (per row).
    """
    soft = groups.sign() * (groups.abs() - l1).clamp_min(0)
    norms = soft.norm(dim=1, keepdim=True)
    return soft * (1 - group / norms.clamp_min(1e-30)).clamp_min(0)


# ---------------------------------------------------------------- activations


def _check_texts(source: Sequence[str], target: Sequence[str]) -> None:
    for name, texts in (("source", source), ("target", target)):
        if isinstance(texts, str) or len(texts) < MIN_TEXTS:
            got = 1 if isinstance(texts, str) else len(texts)
            raise InputError(f"{got} {name} text(s): fitting a steering map needs at least {MIN_TEXTS} source and "
                             f"{MIN_TEXTS} target texts (LinEAS works with 32 or fewer of each)")


def _check_sites(model: Model, sites: Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        sites = [sites]
    names = [model.site_table.check(s) for s in sites]
    if not names or len(set(names)) != len(names):
        raise InputError(f"give one or more distinct sites (got {list(sites)})")
    order = {name: i for i, name in enumerate(model.site_table.names())}
    return sorted(names, key=order.__getitem__)


def _keep(tokens: Any) -> torch.Tensor:
    """Real tokens except each text's first."""
    keep = tokens.real().clone()
    first = keep.int().argmax(1)
    keep[torch.arange(keep.shape[0]), first] = False
    return keep


def token_activations(model: Model, texts: Sequence[str], sites: Sequence[str], *, interventions: Sequence[Any] = (),
                      batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Activations [tokens, d] (float32, CPU) at ``sites`` over every token but the first of each text."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start : start + batch_size]), padding_side="right")
        cache = model.run_with_cache(tokens, list(sites), interventions=interventions, dtype=torch.float32, device="cpu")
        keep = _keep(tokens).cpu()
        for s in sites:
            out[s].append(cache[s][keep])
    return {s: torch.cat(v) for s, v in out.items()}


# ---------------------------------------------------------------- fitting


def fit_lineas(model: Model, source: Sequence[str], target: Sequence[str], sites: Sequence[str], *, steps: int = 100,
               lr: float = 0.02, l1: float = 0.0, group: float = 0.8, batch_size: int = 32, seed: int = 0,
               checkpoint: str | Path | None = None, checkpoint_every: int = 10, resume: bool = False,
               progress: bool = True, log: Callable[[int, float, int], None] | None = None) -> AffineMaps:
    """Fit LinEAS maps at ``sites`` moving the activations of ``source`` texts towards those of ``target``.

    ``lr``: Adam step size; each step uses up to ``batch_size`` source texts. ``l1``, ``group``:
    sparse group lasso strengths, in units of the loss gradient: a unit whose gradient stays below
    about ``group`` (for ``(omega - 1, b)`` together) stays exactly the identity (see ``prox_thresholds``).
    ``checkpoint``: a file where the fit's state (maps, Adam moments, random state, losses) is
    written atomically every ``checkpoint_every`` steps; with ``resume`` a fit continues from it
    and ends with the same maps as an uninterrupted one.
    """
    _check_texts(source, target)
    sites = _check_sites(model, sites)
    if steps < 1 or lr <= 0 or l1 < 0 or group < 0 or batch_size < 1 or checkpoint_every < 1:
        raise InputError("steps, batch_size and checkpoint_every must be >= 1, lr > 0, l1 and group >= 0")
    settings = {"n_source": len(source), "n_target": len(target), "steps": steps, "lr": lr, "l1": l1, "group": group,
                "batch_size": batch_size, "seed": seed, "sites": list(sites), "texts": _texts_digest(source, target)}
    targets = {s: t.sort(0).values for s, t in token_activations(model, target, sites).items()}
    start_layer, source_resid, source_tokens = _frozen_prefix(model, source, sites)
    widths = {s: targets[s].shape[1] for s in sites}
    delta_w = {s: torch.zeros(widths[s], device=model.device, requires_grad=True) for s in sites}
    bias = {s: torch.zeros(widths[s], device=model.device, requires_grad=True) for s in sites}
    params = [t for s in sites for t in (delta_w[s], bias[s])]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        losses = _load_state(Path(checkpoint), settings, delta_w, bias, optimizer, generator)
    frozen = [p for p in model.module.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for step in tqdm(range(len(losses), steps), desc="LinEAS", disable=not progress, initial=len(losses), total=steps):
            rows = torch.randperm(len(source), generator=generator)[:batch_size]
            mapped = _mapped_forward(model, source_tokens.take(rows), source_resid[rows], start_layer, sites, delta_w, bias)
            loss = sum(_w1_to_sorted(mapped[s], targets[s].to(mapped[s])).sum() for s in sites)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for s in sites:
                    l1_t, group_t = prox_thresholds(optimizer, (delta_w[s], bias[s]), l1, group)
                    new = prox_sparse_group_lasso(torch.stack([delta_w[s], bias[s]], 1), l1_t, group_t)
                    delta_w[s].copy_(new[:, 0])
                    bias[s].copy_(new[:, 1])
            losses.append(float(loss.detach()))
            if log is not None:
                log(step, losses[-1], sum(int(((delta_w[s] != 0) | (bias[s] != 0)).sum()) for s in sites))
            if checkpoint is not None and (len(losses) % checkpoint_every == 0 or len(losses) == steps):
                _save_state(Path(checkpoint), settings, delta_w, bias, optimizer, generator, losses)
                fault_point("lineas.checkpoint")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    weight = {s: (1 + delta_w[s].detach()).cpu() for s in sites}
    info = {k: v for k, v in settings.items() if k not in ("sites", "texts")}
    info.update({"loss_first": losses[0], "loss_last": losses[-1], "resumed": resume and len(losses) > 0})
    return AffineMaps("lineas", weight, {s: bias[s].detach().cpu() for s in sites}, info)


def prox_thresholds(optimizer: torch.optim.Adam, pair: tuple[torch.Tensor, torch.Tensor], l1: float,
                    group: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds of the proximal step after an Adam step on ``pair`` = (omega - 1, b) of one site.

    The paper's proximal gradient step moves by ``lr * gradient`` and thresholds by ``lr * strength``,
    so a unit stays off while its gradient is below the strength. Adam moves each entry by
    ``lr * m / (sqrt(v) + eps)`` instead, about ``lr`` whatever the gradient's size; a threshold of
    ``lr * strength`` would then keep every unit whose gradient has a steady sign, however small
    (4,123 of 4,608 units at group 0.5). The proximal step in Adam's own metric thresholds entry
    ``i`` by ``lr * strength / (sqrt(v_i) + eps)`` (exact for the L1 term; for a unit's group, the
    mean of its two entries' scales), which restores "off while the gradient is below the strength".
    Returns per-entry L1 thresholds [units, 2] and per-unit group thresholds [units, 1].
    """
    (hyper,) = optimizer.param_groups
    beta2, eps, lr = hyper["betas"][1], hyper["eps"], hyper["lr"]
    scales = []
    for p in pair:
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        scales.append(lr / (v_hat.sqrt() + eps))
    scale = torch.stack(scales, 1)
    return l1 * scale, group * scale.mean(1, keepdim=True)


def _w1_to_sorted(x: torch.Tensor, y_sorted: torch.Tensor) -> torch.Tensor:
    """``wasserstein_1d(x, y)`` with ``y`` already sorted per column (the fixed targets)."""
    n, m = x.shape[0], y_sorted.shape[0]
    xs = x.sort(0).values
    if n == m:
        return (xs - y_sorted).abs().mean(0)
    ix, iy, w = _merged_grid(n, m, x.device)
    return (w.to(x.dtype)[:, None] * (xs[ix] - y_sorted[iy]).abs()).sum(0)


def _frozen_prefix(model: Model, texts: Sequence[str], sites: Sequence[str]) -> tuple[int, torch.Tensor, Tokens]:
    """The residual stream entering the first block with a map, computed once: nothing below it changes
    during the fit. Returns that layer (0 where a site comes before the first block), the stream and the tokens."""
    tokens = model.tokenize(list(texts), padding_side="right")
    layers = [model.site_table.info(s).layer for s in sites]
    first = min((layer for layer in layers if layer is not None), default=0) if None not in layers else 0
    if first == 0:
        return 0, torch.empty(len(texts), 0), tokens
    site = model.site("resid_pre", first)
    with torch.no_grad():
        resid = model.run_with_cache(tokens, [site], dtype=model.dtype, device=model.device)[site]
    return first, resid, tokens


def _mapped_forward(model: Model, tokens: Tokens, resid: torch.Tensor, start_layer: int, sites: list[str],
                    delta_w: dict[str, torch.Tensor], bias: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``tokens`` from ``start_layer`` (on ``resid``) with every map active, stopping after the last
    site; the mapped activations [tokens, d]."""
    keep = _keep(tokens)
    mapped: dict[str, torch.Tensor] = {}

    def edit(site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            out = act + act * delta_w[site].to(act) + bias[site].to(act)
            mapped[site] = out[keep].float()
            if site == sites[-1]:
                raise StopForward
            return out

        return fn

    with model.intervene(*[Apply(s, edit(s)) for s in sites]):
        try:
            if start_layer == 0:
                model._logits(tokens)
            else:
                model.forward_from(start_layer, resid, tokens)
        except StopForward:
            pass
    return mapped


def _texts_digest(source: Sequence[str], target: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(source), list(target)]).encode()).hexdigest()[:16]


def _save_state(path: Path, settings: dict[str, Any], delta_w: dict[str, torch.Tensor], bias: dict[str, torch.Tensor],
                optimizer: torch.optim.Adam, generator: torch.Generator, losses: list[float]) -> None:
    """Everything the next step depends on, in one safetensors file (the rest in its metadata), written atomically."""
    tensors = {"generator": generator.get_state()}
    steps = set()
    for s in settings["sites"]:
        for name, p in (("delta_w", delta_w[s]), ("bias", bias[s])):
            state = optimizer.state[p]
            tensors[f"{s}.{name}"] = p.detach().cpu().clone()
            tensors[f"{s}.{name}.exp_avg"] = state["exp_avg"].cpu().clone()
            tensors[f"{s}.{name}.exp_avg_sq"] = state["exp_avg_sq"].cpu().clone()
            steps.add(float(state["step"]))
    meta = {"settings": settings, "losses": losses, "adam_step": steps.pop()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"lineas_state": json.dumps(meta)}))


def _load_state(path: Path, settings: dict[str, Any], delta_w: dict[str, torch.Tensor], bias: dict[str, torch.Tensor],
                optimizer: torch.optim.Adam, generator: torch.Generator) -> list[float]:
    """Restore a fit written by ``_save_state``; returns the losses so far (their count is the next step)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["lineas_state"])
        tensors = load_file(str(path))
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} is not a LinEAS fit state ({err}); delete it to start over") from None
    old = meta["settings"]
    differ = sorted(k for k in set(old) | set(settings) if k != "steps" and old.get(k) != settings.get(k))
    if differ or len(meta["losses"]) > settings["steps"]:
        reason = f"{', '.join(differ)} differ" if differ else f"it has done {len(meta['losses'])} steps, more than {settings['steps']}"
        raise InputError(f"cannot resume the LinEAS fit in {path}: {reason}; use the same settings, or delete it to start over")
    generator.set_state(tensors["generator"])
    with torch.no_grad():
        for s in settings["sites"]:
            for name, p in (("delta_w", delta_w[s]), ("bias", bias[s])):
                p.copy_(tensors[f"{s}.{name}"])
                optimizer.state[p] = {"step": torch.tensor(meta["adam_step"]),
                                      "exp_avg": tensors[f"{s}.{name}.exp_avg"].to(p.device),
                                      "exp_avg_sq": tensors[f"{s}.{name}.exp_avg_sq"].to(p.device)}
    return list(meta["losses"])


def fit_act(model: Model, source: Sequence[str], target: Sequence[str], sites: Sequence[str], *,
            kind: Literal["mean", "linear"] = "linear", batch_size: int = 32, progress: bool = True) -> AffineMaps:
    """Mean-AcT (``kind="mean"``) or Linear-AcT (``"linear"``) maps, fitted layer by layer."""
    if kind not in ("mean", "linear"):
        raise InputError(f"kind={kind!r}: choose mean or linear")
    _check_texts(source, target)
    sites = _check_sites(model, sites)
    targets = token_activations(model, target, sites, batch_size=batch_size)
    weight: dict[str, torch.Tensor] = {}
    bias: dict[str, torch.Tensor] = {}
    for s in tqdm(sites, desc=f"{kind}-AcT", disable=not progress):
        earlier = [Affine(e, weight[e], bias[e]) for e in weight]
        x = token_activations(model, source, [s], interventions=earlier, batch_size=batch_size)[s].double()
        y = targets[s].double()
        if kind == "mean":
            weight[s], bias[s] = torch.ones(x.shape[1]), (y.mean(0) - x.mean(0)).float()
            continue
        xq, yq, w = quantile_pairs(x, y)  # weighted least squares of target quantiles on source quantiles
        mx, my = (w[:, None] * xq).sum(0), (w[:, None] * yq).sum(0)
        var = (w[:, None] * (xq - mx) ** 2).sum(0)
        cov = (w[:, None] * (xq - mx) * (yq - my)).sum(0)
        slope = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var))
        weight[s], bias[s] = slope.float(), (my - slope * mx).float()
    info = {"n_source": len(source), "n_target": len(target), "fit": "layer by layer"}
    return AffineMaps(f"{kind}-act", weight, bias, info)


def fit_maps(model: Model, method: str, source: Sequence[str], target: Sequence[str], sites: Sequence[str],
             **kwargs: Any) -> AffineMaps:
    """``fit_lineas`` or ``fit_act`` by name (one of ``METHODS``)."""
    if method == "lineas":
        return fit_lineas(model, source, target, sites, **kwargs)
    if method in ("mean-act", "linear-act"):
        allowed = {k: v for k, v in kwargs.items() if k in ("batch_size", "progress")}
        return fit_act(model, source, target, sites, kind=method.split("-")[0], **allowed)  # type: ignore[arg-type]
    raise InputError(f"method {method!r}: choose one of {', '.join(METHODS)}")

