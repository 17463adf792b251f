"""Training a tuned lens and fitting a linear-map lens from an activation store.

Both read residual rows from a store (harvest ``blocks.*.hook_resid_pre`` or ``resid_post`` plus
the last layer's ``hook_resid_post``, from which the model's final distribution is recomputed:
no model forward pass during training). The last ``holdout`` rows (whole contexts, whose text
does not overlap the training contexts) are kept out and the lens is evaluated there.

Tuned lens: all translators train together on the sum over layers of the mean KL(final || lens)
(as the tuned-lens package does); each layer's unembedding runs as one matmul (bfloat16 where
the CPU has it natively, also for the target distribution: on SmolLM2 that moves the target by
about 5e-4 nats of KL) and its gradient comes from ``kl_and_grad`` without autograd through the
[rows, vocab] matrix; only the translator and the final norm are differentiated. Evaluation
(``evaluate_lenses``) is float32. SGD with Nesterov momentum or Adam, linear
warm-up and decay, gradient clipping. Checkpoints (safetensors + JSON) every
``checkpoint_every`` steps; ``resume`` continues on exactly the next batch.

Linear-map lens: per site, the affine least-squares map to the last residual, from the normal
equations accumulated in float64 over the training rows, with a ridge term ``ridge * mean
diagonal of X^T X`` (the intercept is not penalised).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from interp.config import config_dict, opt, parse_count, parse_layers, write_config
from interp.errors import InputError
from interp.lens.metrics import check_store, evaluate_lenses, kl_and_grad
from interp.lens.readout import Readout
from interp.lens.translators import RESID_KINDS, AffineLens, final_site
from interp.paths import write_text

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.store import ActivationStore


@dataclass
class LensTrainConfig:
    store: Path = opt(help="activation store with the residual sites and the last layer's hook_resid_post")
    lens: str = opt("tuned", "tuned (trained on KL) or linear (least squares, closed form)")
    out: Path | None = opt(None, "folder for the lens, config.json and metrics.json (default: runs/lens-<kind>)")
    model: str = opt("smollm2-135m", "embedded name, HF folder or hub id (must be the store's model)")
    site: str = opt("resid_pre", "residual kind to translate (resid_pre, resid_mid, resid_post), at every layer the store holds")
    layers: str = opt("all", "only these layers: all, 12, 0,4,8 or 10-20")
    holdout: int = opt(8192, "rows at the end of the store kept out of training (rounded up to whole contexts)", parse=parse_count)
    steps: int = opt(200, "tuned: optimizer steps")
    batch_size: int = opt(512, "tuned: tokens per step")
    optimizer: str = opt("adam", "tuned: adam or sgd (Nesterov momentum)")
    lr: float = opt(3e-3, "tuned: peak learning rate (Adam; 3e-3 beat 1e-3 and SGD on the dev split of experiments/lens_kl.py)")
    momentum: float = opt(0.9, "tuned: SGD momentum / Adam beta1")
    weight_decay: float = opt(1e-3, "tuned: weight decay (pulls translators towards the identity)")
    warmup: int = opt(10, "tuned: linear warm-up steps (then linear decay to zero)")
    clip: float = opt(1.0, "tuned: gradient-norm clipping")
    ridge: float = opt(1e-3, "linear: ridge, relative to the mean diagonal of X^T X")
    compute_dtype: str = opt("auto", "unembedding matmul dtype in training: auto (bfloat16 where native), float32, bfloat16")
    compile: bool = opt(True, "tuned: compile the fused KL with torch.compile (falls back to eager)")
    checkpoint_every: int = opt(25, "tuned: steps between checkpoints")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    seed: int = opt(0, "seed of the row order")
    eval_batch: int = opt(256, "rows per evaluation batch")

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        self.out = Path(self.out) if self.out is not None else Path(f"runs/lens-{self.lens}")
        self.holdout = parse_count(self.holdout)
        if self.lens not in ("tuned", "linear"):
            raise InputError(f"--lens {self.lens!r}: train 'tuned' or 'linear' (the logit lens needs no training)")
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"--optimizer {self.optimizer!r}: choose adam or sgd")
        if self.site not in RESID_KINDS:
            raise InputError(f"--site {self.site!r}: a lens reads the residual stream, choose one of {', '.join(RESID_KINDS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("--steps and --batch-size must be positive")


def compute_dtype(name: str) -> torch.dtype | None:
    import interp_kernels as K

    if name == "auto":
        return torch.bfloat16 if K.native_bfloat16() else None
    if name in ("float32", "bfloat16"):
        return None if name == "float32" else torch.bfloat16
    raise InputError(f"compute_dtype={name!r}: choose auto, float32 or bfloat16")


def lens_store_sites(model: Model, store: ActivationStore, kind: str, layers: str = "all") -> list[str]:
    """The store's sites of residual ``kind`` at ``layers``, in layer order, without the last residual (the target)."""
    last = final_site(model)
    chosen = set(parse_layers(layers, model.cfg.n_layers))
    sites = [s for s in model.site_names(f"blocks.*.hook_{kind}")
             if s in store.sites and s != last and model.site_table.info(s).layer in chosen]
    if not sites:
        raise InputError(f"{store.root} holds no {kind} site of {model.cfg.name}; it holds {', '.join(store.sites[:6])}")
    check_store(store, model, [*sites, last])
    return sites


def split_rows(store: ActivationStore, holdout: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(training rows, held-out rows): the held-out rows are the last whole contexts of the store."""
    per_context = int(store.manifest.get("rows_per_context", 1))
    held = math.ceil(holdout / per_context) * per_context
    if not 0 < held < store.n_rows:
        raise InputError(f"holdout {holdout} leaves no training rows or no held-out rows in a store of {store.n_rows} rows")
    return (0, store.n_rows - held), (store.n_rows - held, store.n_rows)


def lr_at(step: int, config: LensTrainConfig) -> float:
    """Linear warm-up to ``lr``, then linear decay to zero at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - config.warmup))


def _optimizer(lens: AffineLens, config: LensTrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":  # lr scaled by (1 - momentum) so the effective step is lr (as the tuned-lens paper)
        return torch.optim.SGD(lens.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.Adam(lens.parameters(), lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, lr: float, config: LensTrainConfig) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * (1 - config.momentum) if config.optimizer == "sgd" else lr


def train_step(lens: AffineLens, readout: Readout, batch: dict[str, torch.Tensor], target: str, *,
               dtype: torch.dtype | None, compile: bool) -> dict[str, float]:
    """Accumulate the gradient of the sum over sites of the mean KL(final || lens) on one batch; per-site KL."""
    with torch.no_grad():
        final_logp = readout.logits(batch[target], dtype=dtype).log_softmax(-1)  # bfloat16: ~5e-4 nats from float32
        p = final_logp.exp()
        neg_entropy = (p * final_logp).sum(-1)
        del final_logp
        weight = readout.weight(dtype)
    rows, losses = p.shape[0], {}
    for site in lens.sites:
        normed = readout.norm(lens.translate(batch[site], site))
        with torch.no_grad():
            z = normed.detach().to(weight.dtype) @ weight.T
            kl, grad = kl_and_grad(z, p, neg_entropy, readout.b_U, compile=compile)
            del z
            grad_normed = (grad @ weight).float() / rows
        normed.backward(grad_normed)
        losses[site] = float(kl.mean())
    return losses


def train_tuned_lens(config: LensTrainConfig, *, model: Model | None = None, progress: bool = True) -> AffineLens:
    """Train (or resume) a tuned lens as configured; writes ``config.out`` and returns the lens."""
    from interp.models import load_model
    from interp.store import ActivationStore

    store = ActivationStore(config.store)
    model = model if model is not None else load_model(config.model)
    sites = lens_store_sites(model, store, config.site, config.layers)
    train_rows, held_rows = split_rows(store, config.holdout)
    dtype = compute_dtype(config.compute_dtype)
    out, checkpoint = config.out, config.out / "checkpoint"
    if (out / "lens" / "lens.json").exists() and not config.resume:
        raise InputError(f"{out} already holds a lens; pass --resume to continue its run or choose another --out")
    readout = Readout(model)
    lens = AffineLens.identity(model, sites, "tuned")
    opt = _optimizer(lens, config)
    reader = store.batches([*sites, final_site(model)], config.batch_size, shuffle=True, seed=config.seed,
                           drop_last=True, rows=train_rows)
    state: dict[str, Any] = {"step": 0, "seconds": 0.0, "losses": []}
    if config.resume and (checkpoint / "state.json").exists():
        state = _load_checkpoint(checkpoint, config, lens, opt, reader)
    write_config(config, out)
    started = time.perf_counter() - state["seconds"]
    bar = tqdm(total=config.steps, initial=state["step"], desc="tuned lens", unit="step", disable=not progress)
    iterator = iter(reader)
    while state["step"] < config.steps:
        try:
            batch = next(iterator)
        except StopIteration:  # next epoch
            iterator = iter(reader)
            continue
        _set_lr(opt, lr_at(state["step"], config), config)
        losses = train_step(lens, readout, batch, final_site(model), dtype=dtype, compile=config.compile)
        torch.nn.utils.clip_grad_norm_(lens.parameters(), config.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(sum(losses.values()) / len(losses))
        bar.update(1)
        bar.set_postfix(kl=f"{state['losses'][-1]:.3f}")
        if state["step"] % config.checkpoint_every == 0 or state["step"] == config.steps:
            state["seconds"] = time.perf_counter() - started
            _save_checkpoint(checkpoint, config, lens, opt, reader, state)
    bar.close()
    lens.meta.update({"train_seconds": round(state["seconds"], 2), "train_rows": list(train_rows),
                      "held_out_rows": list(held_rows), "store": str(store.root), "config": config_dict(config)})
    lens.save(out / "lens")
    return lens


def _save_checkpoint(folder: Path, config: LensTrainConfig, lens: AffineLens, opt: torch.optim.Optimizer,
                     reader: Any, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from interp.paths import atomic_directory

    saved = opt.state_dict()
    tensors = {f"{pid}.{key}": value.contiguous() for pid, entry in saved["state"].items()
               for key, value in entry.items() if isinstance(value, torch.Tensor)}
    with atomic_directory(folder) as tmp:
        lens.save(tmp / "lens")
        save_file(tensors, tmp / "optimizer.safetensors")
        record = {"step": state["step"], "seconds": state["seconds"], "losses": state["losses"], "reader": reader.state_dict(),
                  "param_groups": saved["param_groups"], "config": config_dict(config)}
        (tmp / "state.json").write_text(json.dumps(record))


def _load_checkpoint(folder: Path, config: LensTrainConfig, lens: AffineLens, opt: torch.optim.Optimizer, reader: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    record = json.loads((folder / "state.json").read_text())
    mine = config_dict(config)
    ignored = {"resume", "checkpoint_every", "compile", "eval_batch"}
    differ = [k for k, v in record["config"].items() if k not in ignored and mine.get(k) != v]
    if differ:
        raise InputError(f"cannot resume {folder}: it was run with other settings ({', '.join(differ)}); use the same command")
    saved = AffineLens.load(folder / "lens")
    with torch.no_grad():
        lens.weight.copy_(saved.weight)
        lens.bias.copy_(saved.bias)
    tensors = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    reader.load_state_dict(record["reader"])
    return {"step": record["step"], "seconds": record["seconds"], "losses": record["losses"]}


class NormalEquations:
    """X^T X and X^T Y (float64, with an intercept column) per site, accumulated batch by batch."""

    def __init__(self, model: Model, sites: list[str]):
        d = model.cfg.d_model
        self.model, self.sites, self.target = model, list(sites), final_site(model)
        self.xtx = torch.zeros(len(sites), d + 1, d + 1, dtype=torch.float64)
        self.xty = torch.zeros(len(sites), d + 1, d, dtype=torch.float64)
        self.rows = 0

    @classmethod
    def from_store(cls, model: Model, store: ActivationStore, sites: list[str], rows: tuple[int, int], *,
                   batch_size: int = 4096, progress: bool = True) -> NormalEquations:
        check_store(store, model, [*sites, final_site(model)])
        equations = cls(model, sites)
        for batch in tqdm(store.batches([*sites, equations.target], batch_size, rows=rows), desc="normal equations",
                          disable=not progress, leave=False):
            equations.add(batch)
        return equations

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Accumulate one batch: {site: [rows, d]} for every site and the last residual."""
        y = batch[self.target].double()
        ones = torch.ones(len(y), 1, dtype=torch.float64)
        for i, site in enumerate(self.sites):
            x = torch.cat([batch[site].double(), ones], dim=1)
            self.xtx[i] += x.T @ x
            self.xty[i] += x.T @ y
        self.rows += len(y)

    def solve(self, ridge: float | list[float]) -> AffineLens:
        """The linear-map lens for a ridge (one value, or one per site)."""
        ridges = [ridge] * len(self.sites) if isinstance(ridge, float | int) else list(ridge)
        lens = AffineLens.identity(self.model, self.sites, "linear")
        d = self.model.cfg.d_model
        with torch.no_grad():
            for i, alpha in enumerate(ridges):
                penalty = torch.zeros(d + 1, dtype=torch.float64)
                penalty[:d] = float(alpha) * self.xtx[i, :d, :d].diagonal().mean()
                solution = torch.linalg.solve(self.xtx[i] + torch.diag(penalty), self.xty[i])  # [d + 1, d]
                lens.weight[i] = solution[:d].T.float()
                lens.bias[i] = solution[d].float()
        lens.meta.update({"ridge": ridges, "fit_rows": self.rows})
        return lens


def fit_linear_lens(config: LensTrainConfig, *, model: Model | None = None, progress: bool = True) -> AffineLens:
    """Fit the linear-map lens as configured; writes ``config.out`` and returns the lens."""
    from interp.models import load_model
    from interp.store import ActivationStore

    store = ActivationStore(config.store)
    model = model if model is not None else load_model(config.model)
    sites = lens_store_sites(model, store, config.site, config.layers)
    train_rows, held_rows = split_rows(store, config.holdout)
    if (config.out / "lens" / "lens.json").exists():
        raise InputError(f"{config.out} already holds a lens; choose another --out")
    write_config(config, config.out)
    started = time.perf_counter()
    lens = NormalEquations.from_store(model, store, sites, train_rows, progress=progress).solve(config.ridge)
    lens.meta.update({"train_seconds": round(time.perf_counter() - started, 2), "train_rows": list(train_rows),
                      "held_out_rows": list(held_rows), "store": str(store.root), "config": config_dict(config)})
    lens.save(config.out / "lens")
    return lens


def held_out_report(config: LensTrainConfig, lens: AffineLens, *, model: Model, progress: bool = True):
    """Per-site KL, precision@1 and surprisal on the held-out rows, for this lens and the logit lens."""
    from interp.store import ActivationStore

    store = ActivationStore(config.store)
    _, held_rows = split_rows(store, config.holdout)
    table = evaluate_lenses(model, store, {"logit": None, lens.kind: lens}, lens.sites, held_rows,
                            batch_size=config.eval_batch, progress=progress)
    write_text(config.out / "metrics.json", table.to_json(orient="records", indent=1))
    return table
