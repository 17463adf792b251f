"""Where SNMF reads activations from: a tensor in memory, or one site of an activation store.

Both serve token-major float32 chunks [b, d] on the compute device, read sampled rows, and
describe themselves (saved with a fit, and compared when a fit resumes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from interp.errors import InputError


class Activations(Protocol):
    """Token-major activations read in chunks: ``n`` rows of width ``d``."""

    n: int
    d: int

    def chunks(self, size: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 [b, d] on ``device``) for consecutive chunks covering all rows."""
        ...

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows (sorted global indices into 0..n) as float32 [len(rows), d] on the CPU."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the rows are (for the saved result and for refusing to resume on other data)."""
        ...

    def where(self, row: int) -> str:
        """A human-readable location of ``row`` for error messages."""
        ...


class TensorActivations:
    """Activations already in memory, [n, d]."""

    def __init__(self, acts: torch.Tensor, name: str = "tensor"):
        if acts.ndim != 2:
            raise InputError(f"activations must be [tokens, neurons], got shape {tuple(acts.shape)}")
        self.acts, self.name = acts, name
        self.n, self.d = acts.shape

    def chunks(self, size: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.n, size):
            yield start, self.acts[start : start + size].to(device=device, dtype=torch.float32)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        return self.acts[torch.as_tensor(rows, device=self.acts.device)].float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "n": self.n, "d": self.d}

    def where(self, row: int) -> str:
        return f"row {row}"


class StoreActivations:
    """One site of an activation store, rows ``start..stop``; chunks may be kept on the device.

    ``cache=True`` keeps every chunk on the compute device after its first read (for GPUs, where
    reading the store each iteration would cost more than the matmuls); ``None`` does so on CUDA
    when the rows take under half of the free device memory.
    """

    def __init__(self, store: Any, site: str, rows: tuple[int, int] | None = None, *, cache: bool | None = False):
        store.check_site(site)
        self.store, self.site = store, site
        self.start, self.stop = rows if rows is not None else (0, store.n_rows)
        if not 0 <= self.start < self.stop <= store.n_rows:
            raise InputError(f"rows={rows}: the store {store.root} has rows 0..{store.n_rows}")
        self.n, self.d = self.stop - self.start, store.d(site)
        self.cache = cache
        self._cached: dict[int, torch.Tensor] = {}

    def _use_cache(self, device: torch.device) -> bool:
        if self.cache is None:
            if device.type != "cuda":
                return False
            free, _ = torch.cuda.mem_get_info(device)
            return self.n * self.d * 4 < free / 2
        return self.cache

    def chunks(self, size: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        cache = self._use_cache(device)
        for start in range(0, self.n, size):
            if start in self._cached:
                yield start, self._cached[start]
                continue
            stop = min(start + size, self.n)
            chunk = self.store.read(self.site, slice(self.start + start, self.start + stop))
            chunk = chunk.to(device, non_blocking=True) if device.type != "cpu" else chunk
            if cache:
                self._cached[start] = chunk
            yield start, chunk

    def read(self, rows: np.ndarray) -> torch.Tensor:
        return self.store.read(self.site, np.asarray(rows) + self.start)

    def describe(self) -> dict[str, Any]:
        m = self.store.manifest
        return {"source": "store", "store": str(self.store.root), "site": self.site, "rows": [self.start, self.stop],
                "n": self.n, "d": self.d, "model": m["model"]["name"], "contexts_digest": m["contexts"]["digest"]}

    def where(self, row: int) -> str:
        return f"store row {self.start + row} of {self.store.root} ({self.site})"
