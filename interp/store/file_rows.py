"""Reading a shard's rows with ``pread`` into the caller's tensor, mapping nothing.

A page fault on a memory-mapped file maps the whole cached folio around it (up to 2 MB on recent
kernels), so a shuffled batch of 1,024 rows read through a memory map maps most of a store for a
moment, and the process's resident memory jumps by that much on every step. Copying the rows with
``pread`` adds only the rows themselves; a batch costs about what a released memory map costs
(``experiments/bench/bench_store.py``, "pages released").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from interp.errors import StoreError
from interp.store import format as fmt

AVAILABLE = hasattr(os, "preadv")  # POSIX; elsewhere the store memory-maps its shards


class FileRows:
    """A 2-D ``.npy`` shard file, read by row ranges with ``pread``."""

    def __init__(self, path: Path, storage: str):
        self.path = path
        with open(path, "rb") as handle:
            try:
                self.shape, np_dtype, self.offset = fmt.npy_header(handle)
            except ValueError as err:
                raise StoreError(f"{path}: {err}") from err
        self.row_bytes = self.shape[1] * np_dtype.itemsize
        self.dtype = fmt.from_storage(np.empty((0, self.shape[1]), np_dtype), storage).dtype
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def read_into(self, out: torch.Tensor, rows: slice | np.ndarray) -> None:
        """Write the rows at a slice or at sorted local indices into ``out`` (contiguous, one row per
        index): one ``pread`` per run of consecutive rows."""
        if isinstance(rows, slice):
            firsts, starts, counts = [0], [rows.start], [rows.stop - rows.start]
        else:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            first = np.concatenate([[0], breaks])
            firsts, starts = first.tolist(), rows[first].tolist()
            counts = np.diff(np.concatenate([first, [len(rows)]])).tolist()
        buffer = memoryview(out.view(torch.uint8).numpy()).cast("B")
        for first, start, count in zip(firsts, starts, counts):
            self._read(buffer[first * self.row_bytes:(first + count) * self.row_bytes], self.offset + start * self.row_bytes)

    def _read(self, view: memoryview, position: int) -> None:
        while len(view):  # a single read returns at most about 2 GB
            got = os.preadv(self._fd, [view], position)
            if got <= 0:
                raise StoreError(f"{self.path} ended early (truncated?); run `interp store verify` on its store")
            view, position = view[got:], position + got
