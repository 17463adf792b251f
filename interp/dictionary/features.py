"""What latents respond to, read from a store: firing density, activation histograms, the
top-activating tokens with the latent's activation on the tokens around them, and the tokens a
latent's output direction promotes or suppresses through the unembedding.

``scan_features`` encodes a range of store rows once and keeps every non-zero activation
(row, latent, value); everything else is computed from those: a latent's activation on a
neighbouring token is looked up, not recomputed, because the scan covers whole contexts.
Any ``FeatureSource`` can be scanned: an SAE or transcoder (``DictionaryFeatures``), and any
other factorisation that maps a store site's vectors to non-negative latent activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.dictionary.sae import SparseDictionary
from interp.errors import InputError
from interp.store import ActivationStore


class FeatureSource(Protocol):
    """Latents computed from the vectors of one store site (SAE, transcoder, SNMF, ...)."""

    name: str
    kind: str  # shown on the page: "sae", "transcoder", ...
    n_latents: int
    site: str  # the store site the latents read
    model: str  # a load_model spec (tokenizer, unembedding)

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zero activations of ``x`` [rows, d] as (row, latent, value) triplets (int64, int64, float32)."""

    def output_directions(self) -> torch.Tensor | None:
        """[latents, d_model]: what each latent adds to the residual stream per unit of activation (None if nothing)."""


@dataclass
class DictionaryFeatures:
    """A SparseDictionary (SAE or transcoder) as a ``FeatureSource``."""

    dictionary: SparseDictionary
    name: str = "dictionary"

    def __post_init__(self) -> None:
        c = self.dictionary.config
        self.kind = "transcoder" if c.is_transcoder else "sae"
        self.n_latents, self.site, self.model = c.n_latents, c.input_site, c.model
        self.dictionary.eval()

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        code = self.dictionary.encode(x)
        if code.dense is not None:
            rows, latents = code.dense.nonzero(as_tuple=True)
            return rows, latents, code.dense[rows, latents].float()
        active = code.values > 0
        rows = torch.arange(x.shape[0]).unsqueeze(1).expand_as(code.values)[active]
        return rows, code.indices[active], code.values[active].float()

    def output_directions(self) -> torch.Tensor:
        d = self.dictionary
        return (d.W_dec / d.output_scale).detach().float()  # decode() divides by output_scale


@dataclass
class FeatureScan:
    """Every non-zero activation over store rows ``first_row .. first_row + n_rows`` (whole contexts).

    ``top_rows`` / ``top_values`` [latents, n]: each latent's strongest rows (local row index,
    -1 where it fired on fewer rows); ``histograms`` [latents, bins]: counts of its non-zero
    activations in ``bins`` equal bins from 0 to ``max_activation``.
    """

    latent_ids: np.ndarray  # the latents scanned (all, or the ones asked for)
    first_row: int
    n_rows: int
    rows: np.ndarray  # [n_rows, 5] store row table of the scanned range
    fire_counts: np.ndarray
    max_activation: np.ndarray
    histograms: np.ndarray
    top_rows: np.ndarray
    top_values: np.ndarray
    _keys: np.ndarray  # sorted latent * n_rows + local row of every non-zero activation
    _values: np.ndarray

    @property
    def density(self) -> np.ndarray:
        """Fraction of scanned tokens on which each latent fired."""
        return self.fire_counts / max(self.n_rows, 1)

    def activation_at(self, latent_index: np.ndarray, local_rows: np.ndarray) -> np.ndarray:
        """Activation of latents (positions in ``latent_ids``) at local rows; 0 where it did not fire."""
        keys = np.asarray(latent_index, dtype=np.int64) * self.n_rows + np.asarray(local_rows, dtype=np.int64)
        where = np.searchsorted(self._keys, keys).clip(max=max(len(self._keys) - 1, 0))
        found = (self._keys[where] == keys) if len(self._keys) else np.zeros(keys.shape, dtype=bool)
        return np.where(found, self._values[where] if len(self._values) else 0.0, 0.0).astype(np.float32)

    def context_bounds(self, local_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[start, stop) local rows of the context holding each row (contexts are contiguous runs)."""
        starts = self.context_starts()
        index = np.searchsorted(starts, local_rows, side="right") - 1
        stops = np.append(starts[1:], self.n_rows)
        return starts[index], stops[index]

    def context_starts(self) -> np.ndarray:
        """Local rows where a new context begins."""
        change = np.flatnonzero(np.diff(self.rows[:, 0]) != 0) + 1
        return np.concatenate([[0], change]).astype(np.int64)

    def index_of(self, latent: int) -> int:
        where = np.flatnonzero(self.latent_ids == latent)
        if not len(where):
            raise InputError(f"latent {latent} was not scanned (scanned: {len(self.latent_ids)} latents)")
        return int(where[0])

    def top(self, latent: int) -> pd.DataFrame:
        """The latent's top rows: rank, activation, row (global store row), context, position, token."""
        i = self.index_of(latent)
        keep = self.top_rows[i] >= 0
        local = self.top_rows[i][keep]
        meta = self.rows[local]
        return pd.DataFrame({"latent": latent, "rank": np.flatnonzero(keep), "activation": self.top_values[i][keep],
                             "row": local + self.first_row, "context": meta[:, 0], "position": meta[:, 1], "token": meta[:, 2]})

    def examples(self, latent: int, tokenizer: Any, *, left: int = 24, right: int = 6) -> pd.DataFrame:
        """One row per top example: text before the token, the token, text after, and the latent's
        activation on every token of the window (``tokens``, ``activations``, ``index`` of the top token)."""
        i = self.index_of(latent)
        top = self.top(latent)
        records = []
        for example in top.itertuples():
            local = example.row - self.first_row
            start, stop = (int(v[0]) for v in self.context_bounds(np.array([local])))
            lo, hi = max(start, local - left), min(stop, local + right + 1)
            window = np.arange(lo, hi)
            tokens = [tokenizer.decode([int(t)]) for t in self.rows[window, 2]]
            at = local - lo
            records.append({
                "rank": example.rank, "activation": float(example.activation), "context": int(example.context),
                "position": int(example.position), "left": "".join(tokens[:at]), "token": tokens[at],
                "right": "".join(tokens[at + 1 :]), "tokens": tokens,
                "activations": self.activation_at(np.full(len(window), i), window).tolist(), "index": at,
            })
        return pd.DataFrame.from_records(records)


@torch.no_grad()
def scan_features(
    source: FeatureSource, store: ActivationStore, *, rows: tuple[int, int] | None = None, n: int = 20,
    latents: list[int] | None = None, bins: int = 24, batch_size: int = 4096, progress: bool = True,
) -> FeatureScan:
    """Encode store ``rows`` (default: all; widened to whole contexts) and summarise every latent."""
    store.check_site(source.site)
    latent_ids = np.arange(source.n_latents) if latents is None else np.asarray(sorted(set(latents)), dtype=np.int64)
    if len(latent_ids) == 0 or latent_ids.min() < 0 or latent_ids.max() >= source.n_latents:
        raise InputError(f"latents must lie in 0..{source.n_latents - 1}")
    if n < 1 or bins < 1:
        raise InputError(f"n ({n}) and bins ({bins}) must be positive")
    first, stop = whole_contexts(store, rows or (0, store.n_rows))
    table = store.rows(slice(first, stop))
    position = np.full(source.n_latents, -1, dtype=np.int64)  # latent id -> index in latent_ids
    position[latent_ids] = np.arange(len(latent_ids))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(total=stop - first, unit="tok", unit_scale=True, desc=f"scan {source.name}", disable=not progress)
    loader = store.batches(source.site, batch_size, rows=(first, stop))
    for number, x in enumerate(loader):
        offset = loader.rows_of(number).start - first
        r, lat, v = source.activations(x)
        index = position[lat.numpy()]
        keep = index >= 0
        parts.append(((r.numpy()[keep] + offset).astype(np.int64), index[keep], v.numpy()[keep].astype(np.float32)))
        bar.update(x.shape[0])
    bar.close()
    local = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    index = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    values = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    return _summarise(latent_ids, first, stop - first, table, local, index, values, n, bins)


def _summarise(latent_ids: np.ndarray, first: int, n_rows: int, table: np.ndarray, local: np.ndarray, index: np.ndarray,
               values: np.ndarray, n: int, bins: int) -> FeatureScan:
    count = len(latent_ids)
    fire_counts = np.bincount(index, minlength=count).astype(np.int64)
    order = np.lexsort((-values, index))  # by latent, strongest first
    index_sorted, values_sorted, local_sorted = index[order], values[order], local[order]
    segment_start = np.concatenate([[0], np.cumsum(fire_counts)[:-1]])
    rank = np.arange(len(order)) - segment_start[index_sorted]
    top_rows = np.full((count, n), -1, dtype=np.int64)
    top_values = np.zeros((count, n), dtype=np.float32)
    keep = rank < n
    top_rows[index_sorted[keep], rank[keep]] = local_sorted[keep]
    top_values[index_sorted[keep], rank[keep]] = values_sorted[keep]
    max_activation = top_values[:, 0].copy()
    scale = np.where(max_activation > 0, max_activation, 1.0)[index]
    which_bin = np.minimum((values / scale * bins).astype(np.int64), bins - 1)
    histograms = np.bincount(index * bins + which_bin, minlength=count * bins).reshape(count, bins).astype(np.int64)
    keys = index * n_rows + local
    key_order = np.argsort(keys, kind="stable")
    return FeatureScan(latent_ids, first, n_rows, table, fire_counts, max_activation, histograms, top_rows, top_values,
                       keys[key_order], values[key_order])


def whole_contexts(store: ActivationStore, rows: tuple[int, int]) -> tuple[int, int]:
    """``rows`` widened outwards so that it starts and ends on context boundaries."""
    start, stop = rows
    if not 0 <= start < stop <= store.n_rows:
        raise InputError(f"rows={rows}: the store has rows 0..{store.n_rows}")
    pad = max(int(store.manifest.get("rows_per_context", 1)), 1)
    lo, hi = max(0, start - pad), min(store.n_rows, stop + pad)
    context = store.rows(slice(lo, hi))[:, 0]
    change = np.flatnonzero(np.diff(context) != 0) + 1 + lo  # rows where a new context begins
    starts, ends = np.concatenate([[lo], change]), np.concatenate([change, [hi]])
    return int(starts[starts <= start].max()), int(ends[ends >= stop].min())


def scan_rows(store: ActivationStore, tokens: int | None, held_out: tuple[int, int] | None = None) -> tuple[int, int]:
    """The rows a dashboard reads: the last ``tokens`` rows (where a training run keeps its held-out
    rows), or ``held_out`` when given and ``tokens`` is None; everything when both are None."""
    if tokens is None:
        return tuple(held_out) if held_out else (0, store.n_rows)  # type: ignore[return-value]
    if tokens < 1:
        raise InputError(f"tokens must be positive, got {tokens}")
    return max(0, store.n_rows - tokens), store.n_rows


@torch.no_grad()
def decoded_tokens(model: Any, directions: torch.Tensor | None, *, k: int = 8, chunk: int = 512
                   ) -> dict[str, np.ndarray] | None:
    """Tokens each direction promotes / suppresses most: the direction through the final norm and the
    unembedding (as a residual-stream vector would be read at the last layer). None when the
    directions do not live in the residual stream (width differs from the model's)."""
    if directions is None or model is None or directions.shape[1] != model.cfg.d_model:
        return None
    out: dict[str, list[torch.Tensor]] = {"promoted": [], "promoted_logits": [], "suppressed": [], "suppressed_logits": []}
    for part in directions.split(chunk):
        logits = model.unembed(part.to(model.device, model.dtype)).float()
        high, low = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        out["promoted"].append(high.indices.cpu())
        out["promoted_logits"].append(high.values.cpu())
        out["suppressed"].append(low.indices.cpu())
        out["suppressed_logits"].append(low.values.cpu())
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def top_activations(dictionary: SparseDictionary, store: ActivationStore, latents: list[int] | None = None, *, n: int = 20,
                    rows: tuple[int, int] | None = None, batch_size: int = 8192) -> pd.DataFrame:
    """The ``n`` highest activations of each latent over store ``rows`` (widened to whole contexts).

    Columns: latent, rank, activation, row, context, position, token.
    """
    scan = scan_features(DictionaryFeatures(dictionary), store, rows=rows, n=n, latents=latents, batch_size=batch_size,
                         progress=False)
    return pd.concat([scan.top(int(latent)) for latent in scan.latent_ids], ignore_index=True)
