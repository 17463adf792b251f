"""The SNMF fit: A ≈ Y·Zᵀ with Y ≥ 0 and winner-take-all sparse Z, streamed over chunks of tokens.

Notation. Activations are read token-major, ``A [n tokens, d neurons]`` (the paper's A is its
transpose). The fit finds ``Z [d, k]`` (signed; each column a feature, a sparse combination of
neurons) and ``Y [n, k] ≥ 0`` (each token's feature coefficients). One iteration:

1. ``Z ← (AᵀY)(YᵀY + λI)⁻¹``: ridge least squares, λ = ``ridge`` × the mean diagonal of YᵀY;
2. winner-take-all: keep the ⌈p·d⌉ largest-magnitude entries of each column of Z, zero the rest;
3. give every column of Y unit norm and multiply Z's columns by the old norms (YZᵀ unchanged);
4. ``Y ← Y ⊙ sqrt((P⁺ + Y·Q⁻) / (P⁻ + Y·Q⁺))`` with ``P = A·Z``, ``Q = ZᵀZ`` and X⁺, X⁻ the
   positive and negative parts (Ding, Li and Jordan 2010): Y stays non-negative.

Winner-take-all makes the error non-monotone, so every iterate's error is measured and the best
(Z, Y) kept. The fit stops once ``patience`` iterations in a row fail to lower the best error by a
relative ``tol`` (or at ``max_iter``).

Streaming. Step 1 needs only ``AᵀY`` [d, k] and ``YᵀY`` [k, k], summed over chunks; step 4 is per
token. So one pass over the activations per iteration computes, chunk by chunk, the new Y, the
two sums for the next Z, and the error
``‖A − YZᵀ‖² = ‖A‖² − 2⟨AZ, Y⟩ + ⟨ZᵀZ, YᵀY⟩``, without forming the reconstruction. A is never
held whole; Y lives in three slots (the one read, the one written, the best so far), on the
compute device or in ``.npy`` files of a work folder, which also makes the fit resumable: after
every iteration the state is saved atomically, and a killed fit resumes at the iteration it was
in, with the same result as an uninterrupted run. Chunk matmuls run in float32; sums over chunks
and the error are kept in float64.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from interp.errors import InputError, TrainingError
from interp.paths import atomic_write
from interp.snmf.data import Activations

INITS = ("random", "svd", "kmeans")
INIT_BLOCK = 4096  # random initial Y is drawn per block of rows, so it does not depend on the chunk size
STATE = "state.safetensors"
TINY = torch.finfo(torch.float32).tiny


@dataclass
class SNMFConfig:
    """Settings of one factorisation (see the module docstring for the algorithm)."""

    k: int = 100
    sparsity: float = 0.01  # p: each feature keeps ceil(p * d) neurons
    init: str = "kmeans"  # random, svd or kmeans (kmeans: lowest dev-set error, see the README)
    max_iter: int = 300
    patience: int = 20
    tol: float = 1e-4
    ridge: float = 1e-6
    seed: int = 0
    chunk_size: int = 16_384
    init_rows: int = 32_768  # tokens sampled for the svd / kmeans initialisation
    kmeans_iters: int = 10
    device: str = "cpu"

    def check(self, n: int, d: int) -> None:
        """Refuse settings that cannot work on an [n, d] activation matrix (before any work)."""
        if self.init not in INITS:
            raise InputError(f"init={self.init!r}: choose one of {', '.join(INITS)}")
        if not 0 < self.sparsity <= 1:
            raise InputError(f"sparsity={self.sparsity}: give the fraction of neurons each feature keeps, in (0, 1]")
        if self.k < 1:
            raise InputError(f"k={self.k}: the number of features must be at least 1")
        if self.k > n:
            raise InputError(f"k={self.k} features but only {n:,} tokens: k must not exceed the number of tokens")
        for name in ("max_iter", "patience", "chunk_size", "init_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1")
        if self.init != "random" and self.k > min(n, self.init_rows):
            raise InputError(f"init={self.init} with k={self.k} needs at least k sampled tokens (init_rows={self.init_rows}, n={n})")
        if self.tol < 0 or self.ridge < 0:
            raise InputError("tol and ridge must be non-negative")

    def kept(self, d: int) -> int:
        """Neurons each feature keeps."""
        return max(1, math.ceil(round(self.sparsity * d, 9)))  # round: 0.05 * 100 is 5.000000000000001


@dataclass
class FitResult:
    """The best iterate, scaled so every column of Y has unit norm, features sorted by ‖z‖.

    ``Y`` is a tensor when the fit ran in memory, else ``None`` and the rows are in ``y_path``
    ([n, k] float32 .npy). ``top_rows`` / ``top_values`` [k, n_top]: each feature's highest
    coefficients and the rows (0..n) holding them.
    """

    Z: torch.Tensor
    Y: torch.Tensor | None
    y_path: Path | None
    top_rows: torch.Tensor
    top_values: torch.Tensor
    info: dict[str, Any]


# ------------------------------------------------------------------------ the steps


def ridge_solve(AtY: torch.Tensor, YtY: torch.Tensor, ridge: float) -> torch.Tensor:
    """Z [d, k] minimising ‖A − YZᵀ‖² + λ‖Z‖², from AᵀY [d, k] and YᵀY [k, k] (float64 solve)."""
    gram = YtY.double()
    lam = ridge * float(gram.diagonal().mean()) + TINY
    gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, AtY.double().T).T.float()


def winner_take_all(Z: torch.Tensor, keep: int) -> torch.Tensor:
    """Z with only the ``keep`` largest-magnitude entries of each column (exactly ``keep``, ties by index)."""
    if keep >= Z.shape[0]:
        return Z.clone()
    index = Z.abs().topk(keep, dim=0).indices
    return torch.zeros_like(Z).scatter_(0, index, Z.gather(0, index))


def multiplicative_update(Y: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """One semi-NMF update of Y [b, k] ≥ 0 given P = A·Z [b, k] and Q = ZᵀZ [k, k] (a new tensor).

    In place where possible: these are the only elementwise passes of an iteration over
    [tokens, k] tensors, and fresh tensors cost page faults. Nothing overflows or meets 0 * inf:
    0/0 (a feature whose column of Z is zero) leaves Y as it is, and an exact zero stays zero.
    Entries below 1e-30 become zero: in float32 they only approach denormals, slow on CPUs.
    """
    k = Q.shape[0]
    terms = Y @ torch.cat([(-Q).clamp(min=0), Q.clamp(min=0)], 1)  # [b, 2k]: Y·Q⁻ | Y·Q⁺
    numerator, denominator = terms[:, :k], terms[:, k:]
    positive = P.clamp(min=0)
    numerator.add_(positive).clamp_min_(TINY).sqrt_()
    # P⁻ = −min(P, 0) added directly: (Y·Q⁺ + P⁺) − P cancels to 0 in float32 where P⁺ dwarfs Y·Q⁺,
    # and a zero denominator multiplied a tiny Y by up to 1e19 (the fit then diverged)
    denominator.sub_(P.clamp(max=0)).clamp_min_(TINY).rsqrt_()
    out = Y * numerator
    out.mul_(denominator)
    return torch.nn.functional.threshold_(out, 1e-30, 0.0)


# ------------------------------------------------------------------------ Y storage


class YSlots:
    """Three [n, k] float32 slots for Y: tensors on the device, or .npy files in ``folder``."""

    def __init__(self, n: int, k: int, device: torch.device, folder: Path | None = None, *, reopen: bool = False):
        self.n, self.k, self.device, self.folder = n, k, device, folder
        self._memory: dict[int, torch.Tensor] = {}
        self._files: dict[int, np.memmap] = {}
        if folder is not None and reopen:
            for slot in range(3):
                if self.path(slot).exists():
                    self._files[slot] = np.load(self.path(slot), mmap_mode="r+")

    def path(self, slot: int) -> Path:
        assert self.folder is not None
        return self.folder / f"y{slot}.npy"

    def _file(self, slot: int) -> np.memmap:
        if slot not in self._files:
            self._files[slot] = np.lib.format.open_memmap(self.path(slot), mode="w+", dtype=np.float32, shape=(self.n, self.k))
        return self._files[slot]

    def read(self, slot: int, start: int, stop: int) -> torch.Tensor:
        if self.folder is None:
            return self._memory[slot][start:stop]
        return torch.from_numpy(np.array(self._files[slot][start:stop])).to(self.device)

    def write(self, slot: int, start: int, values: torch.Tensor) -> None:
        if self.folder is None:
            if slot not in self._memory:
                self._memory[slot] = torch.empty(self.n, self.k, device=self.device)
            self._memory[slot][start : start + len(values)] = values
        else:
            self._file(slot)[start : start + len(values)] = values.cpu().numpy()

    def tensor(self, slot: int) -> torch.Tensor:
        return self._memory[slot]

    def keep_only(self, slot: int, final: Path | None) -> Path | None:
        """Drop every slot but ``slot``; on disk, rename it to ``final``."""
        self._memory = {s: t for s, t in self._memory.items() if s == slot}
        if self.folder is None:
            return None
        self._files.clear()
        for other in range(3):
            if other != slot and self.path(other).exists():
                self.path(other).unlink()
        assert final is not None
        os.replace(self.path(slot), final)
        return final


# ------------------------------------------------------------------------ the fit


class _Sums:
    """What one pass accumulates: AᵀY, YᵀY, ⟨AZ, Y⟩ (float64)."""

    def __init__(self, d: int, k: int, device: torch.device):
        self.AtY = torch.zeros(d, k, dtype=torch.float64, device=device)
        self.YtY = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.PY = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, A: torch.Tensor, Y: torch.Tensor) -> None:
        self.AtY += A.T @ Y
        self.YtY += Y.T @ Y


def fit(source: Activations, config: SNMFConfig, *, workdir: str | Path | None = None, resume: bool = False,
        progress: bool = True, n_top: int = 64) -> FitResult:
    """Factorise ``source``; Y in memory, or in ``workdir`` (then the fit is resumable there)."""
    config.check(source.n, source.d)
    device = torch.device(config.device)
    check_finite(source, config.chunk_size, device)
    folder = Path(workdir) if workdir is not None else None
    # Settings that only decide when to stop (or where to compute) may change on resume.
    settings = {name: value for name, value in asdict(config).items() if name not in ("max_iter", "patience", "device")}
    identity = {"config": settings, "source": source.describe()}
    state = _load_state(folder, identity) if (folder is not None and resume) else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if state is None:
            (folder / STATE).unlink(missing_ok=True)
    slots = YSlots(source.n, config.k, device, folder, reopen=state is not None)
    keep = config.kept(source.d)
    if state is None:
        started = time.perf_counter()
        make_y0 = _initialiser(source, config, device)
        sums, a2, col_sum = _first_pass(source, config, device, slots, make_y0)
        state = {"iteration": 0, "cur": 0, "best": -1, "best_error": math.inf, "best_iteration": 0, "since_improvement": 0,
                 "history": [], "a2": a2, "centred": a2 - float((col_sum.double() ** 2).sum()) / source.n,
                 "init_seconds": time.perf_counter() - started, "iteration_seconds": []}
        tensors = {"AtY": sums.AtY, "YtY": sums.YtY, "Z_best": torch.zeros(source.d, config.k), "YtY_best": sums.YtY.clone()}
        if folder is not None:
            _save_state(folder, identity, state, tensors)
    else:
        state, tensors = state
        tensors = {name: t.to(device) for name, t in tensors.items()}
    bar = tqdm(total=config.max_iter, initial=state["iteration"], desc=f"snmf k={config.k}", disable=not progress, unit="it")
    while state["iteration"] < config.max_iter and state["since_improvement"] < config.patience:
        started = time.perf_counter()
        Z = winner_take_all(ridge_solve(tensors["AtY"], tensors["YtY"], config.ridge), keep)
        scale = tensors["YtY"].diagonal().sqrt().float().clamp_min(TINY)
        Z = Z * scale
        target = next(s for s in range(3) if s not in (state["cur"], state["best"]))
        sums = _update_pass(source, config, device, slots, Z, state["cur"], target, scale)
        Q = Z.double().T @ Z.double()
        error = state["a2"] - 2 * float(sums.PY) + float((Q * sums.YtY).sum())
        if not math.isfinite(error):
            raise TrainingError(f"the SNMF error became {error} at iteration {state['iteration'] + 1}; "
                                "try a larger ridge or another init")
        error = max(error, 0.0)  # rounding can take an exact fit a hair below zero
        state["iteration_seconds"].append(time.perf_counter() - started)
        state["iteration"] += 1
        state["cur"] = target
        state["history"].append(error)
        if error < state["best_error"] * (1 - config.tol):
            state["since_improvement"] = 0
        else:
            state["since_improvement"] += 1
        if error < state["best_error"]:
            state.update(best=target, best_error=error, best_iteration=state["iteration"])
            tensors["Z_best"], tensors["YtY_best"] = Z, sums.YtY
        tensors["AtY"], tensors["YtY"] = sums.AtY, sums.YtY
        if folder is not None:  # Y's slots are shared file maps: the kernel writes them even if we are killed
            _save_state(folder, identity, state, tensors)
        bar.update(1)
        bar.set_postfix(rel_error=f"{error / state['a2']:.4f}", best=f"{state['best_error'] / state['a2']:.4f}")
    bar.close()
    return _finish(source, config, device, slots, state, tensors, folder, n_top)


def _initialiser(source: Activations, config: SNMFConfig, device: torch.device) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A function (first row, chunk of A) -> initial Y rows [b, k] > 0."""
    if config.init == "random":
        def random_rows(start: int, chunk: torch.Tensor) -> torch.Tensor:
            stop = start + len(chunk)
            blocks = []
            for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1):
                rng = np.random.default_rng([config.seed, block])
                values = rng.random((INIT_BLOCK, config.k), dtype=np.float32)
                lo, hi = max(start - block * INIT_BLOCK, 0), min(stop - block * INIT_BLOCK, INIT_BLOCK)
                blocks.append(values[lo:hi])
            return torch.from_numpy(np.concatenate(blocks)).to(device).clamp_min(1e-6)

        return random_rows
    rows = np.sort(np.random.default_rng(config.seed).choice(source.n, min(source.n, config.init_rows), replace=False))
    sample = source.read(rows).to(device)
    if config.init == "svd":
        return _svd_initialiser(sample, config.k)
    return _kmeans_initialiser(sample, config, device)


def _svd_initialiser(sample: torch.Tensor, k: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Y0 = the positive part of A·U·Σ^(-1/2) (U, Σ: top-k eigenpairs of the sample's AᵀA), floored.

    This is the token side of the truncated SVD, V·Σ^(1/2). Each singular vector's sign is chosen
    so that its projections are mostly positive; negative entries become a small floor (1e-4 of
    the column's rms) because multiplicative updates cannot move an exact zero.
    """
    gram = (sample.T.double() @ sample.double())
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:k].clamp_min(1e-12), vectors.flip(1)[:, :k]
    proj = sample.double() @ vectors
    signs = torch.where(proj.clamp(min=0).sum(0) >= (-proj).clamp(min=0).sum(0), 1.0, -1.0).to(proj)
    transform = (vectors * signs / values.sqrt().sqrt()).float()
    floor = ((proj * signs / values.sqrt().sqrt()).pow(2).mean(0).sqrt() * 1e-4).float().clamp_min(TINY)

    def svd_rows(_start: int, chunk: torch.Tensor) -> torch.Tensor:
        return torch.maximum(chunk @ transform, floor)

    return svd_rows


def _kmeans_initialiser(sample: torch.Tensor, config: SNMFConfig, device: torch.device) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Y0 = the one-hot nearest-centroid assignment + 0.2 (Ding, Li and Jordan), centroids from
    Lloyd's k-means on the sample, started at k distinct sampled tokens (seeded)."""
    g = np.random.default_rng([config.seed, 1])
    centres = sample[torch.as_tensor(g.choice(len(sample), config.k, replace=False), device=device)].clone()

    def nearest(x: torch.Tensor) -> torch.Tensor:
        return ((centres * centres).sum(1) - 2 * x @ centres.T).argmin(1)

    for _ in range(config.kmeans_iters):
        labels = nearest(sample)
        sums = torch.zeros_like(centres).index_add_(0, labels, sample)
        counts = torch.bincount(labels, minlength=config.k)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed empty clusters at random sampled tokens
            picks = torch.as_tensor(g.choice(len(sample), int(empty.sum()), replace=False), device=device)
            centres[empty] = sample[picks]

    def kmeans_rows(_start: int, chunk: torch.Tensor) -> torch.Tensor:
        y = torch.full((len(chunk), config.k), 0.2, device=device)
        return y.scatter_(1, nearest(chunk)[:, None], 1.2)

    return kmeans_rows


def _first_pass(source: Activations, config: SNMFConfig, device: torch.device, slots: YSlots,
                make_y0: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[_Sums, float, torch.Tensor]:
    """Write Y0 to slot 0 and sum AᵀY0, Y0ᵀY0, ‖A‖² and A's column sums."""
    sums = _Sums(source.d, config.k, device)
    a2 = torch.zeros((), dtype=torch.float64, device=device)
    col_sum = torch.zeros(source.d, dtype=torch.float64, device=device)
    for start, A in source.chunks(config.chunk_size, device):
        Y = make_y0(start, A)
        slots.write(0, start, Y)
        sums.add(A, Y)
        a2 += torch.linalg.vector_norm(A, dim=1).double().pow(2).sum()  # per-row norms: no [b, d] temporary
        col_sum += A.sum(0).double()
    return sums, float(a2), col_sum


def _update_pass(source: Activations, config: SNMFConfig, device: torch.device, slots: YSlots, Z: torch.Tensor,
                 read: int, write: int, scale: torch.Tensor) -> _Sums:
    """Step 4 on every chunk (Y read from slot ``read`` divided by ``scale``), sums for the next Z."""
    sums = _Sums(source.d, config.k, device)
    Q = Z.T @ Z
    for start, A in source.chunks(config.chunk_size, device):
        Y = slots.read(read, start, start + len(A)) / scale
        P = A @ Z
        Y = multiplicative_update(Y, P, Q)
        slots.write(write, start, Y)
        sums.add(A, Y)
        sums.PY += P.mul_(Y).sum(1).double().sum()  # ⟨AZ, Y⟩, per-row sums in float32
    return sums


def _finish(source: Activations, config: SNMFConfig, device: torch.device, slots: YSlots, state: dict[str, Any],
            tensors: dict[str, torch.Tensor], folder: Path | None, n_top: int) -> FitResult:
    """Normalise the best iterate (unit columns of Y), sort features by ‖z‖, find each one's top rows."""
    scale = tensors["YtY_best"].diagonal().sqrt().float().clamp_min(TINY)
    Z = tensors["Z_best"] * scale
    order = Z.norm(dim=0).argsort(descending=True)
    Z = Z[:, order]
    best = state["best"]
    n_top = min(n_top, source.n)
    top_values = torch.full((config.k, n_top), -1.0, device=device)
    top_rows = torch.zeros((config.k, n_top), dtype=torch.long, device=device)
    for start in range(0, source.n, config.chunk_size):
        stop = min(start + config.chunk_size, source.n)
        Y = (slots.read(best, start, stop) / scale)[:, order]
        slots.write(best, start, Y)
        values, where = Y.T.topk(min(n_top, stop - start), dim=1)
        merged_values = torch.cat([top_values, values], 1)
        merged_rows = torch.cat([top_rows, where + start], 1)
        top_values, pick = merged_values.topk(n_top, dim=1)
        top_rows = merged_rows.gather(1, pick)
    y_path = slots.keep_only(best, folder / "Y.npy" if folder is not None else None)
    Y = slots.tensor(best) if folder is None else None
    info = {
        "iterations": state["iteration"], "best_iteration": state["best_iteration"],
        "stopped": "max_iter" if state["since_improvement"] < config.patience else "patience",
        "error": state["best_error"], "relative_error": state["best_error"] / max(state["a2"], TINY),
        "fvu": state["best_error"] / max(state["centred"], TINY),
        "history": [e / max(state["a2"], TINY) for e in state["history"]],
        "dead_features": int((Z.abs().sum(0) == 0).sum()), "init_seconds": state["init_seconds"],
        "iteration_seconds": state["iteration_seconds"], "seconds": state["init_seconds"] + sum(state["iteration_seconds"]),
        "neurons_per_feature": config.kept(source.d), "n": source.n, "d": source.d,
    }
    if folder is not None:
        (folder / STATE).unlink(missing_ok=True)
    return FitResult(Z.cpu(), Y, y_path, top_rows.cpu(), top_values.cpu(), info)


def check_finite(source: Activations, chunk_size: int = 16_384, device: torch.device | str = "cpu") -> None:
    """Refuse activations holding NaN or inf, naming the first such row (one read of every chunk)."""
    for start, A in source.chunks(chunk_size, torch.device(device)):
        bad = ~torch.isfinite(A).all(dim=1)
        if bool(bad.any()):
            first = start + int(bad.nonzero()[0])
            raise InputError(f"NaN or inf in the activations at {source.where(first)} ({int(bad.sum())} such rows in "
                             "that chunk); SNMF needs finite activations: re-harvest the store or leave these rows out")


# ------------------------------------------------------------------------ checkpoints


def _save_state(folder: Path, identity: dict[str, Any], state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """State tensors and JSON (as safetensors metadata) in one file, renamed into place."""
    meta = {"identity": json.dumps(identity, sort_keys=True), "state": json.dumps(state)}
    values = {name: t.detach().cpu().clone() for name, t in tensors.items()}
    atomic_write(folder / STATE, lambda tmp: save_file(values, str(tmp), metadata=meta))


def _load_state(folder: Path, identity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    path = folder / STATE
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    saved = json.loads(meta["identity"])
    if saved != json.loads(json.dumps(identity, sort_keys=True)):
        changed = sorted(key for key in saved["config"] if saved["config"][key] != identity["config"].get(key))
        what = f"settings {', '.join(changed)}" if changed else "activations"
        raise InputError(f"cannot resume the fit in {folder}: it was started with other {what}; use another folder "
                         "or start afresh (without resume)")
    return json.loads(meta["state"]), tensors
