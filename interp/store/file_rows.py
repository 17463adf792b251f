"""Reading a shard's rows with ``pread`` into the caller's tensor, mapping nothing.

A page fault on a memory-mapped file maps the whole cached folio around it (up to 2 MB on recent
kernels), so a shuffled batch of 1,024 rows read through a memory map maps much of a store for a
moment, and the process's resident memory jumps by that much on every step. Copying the rows with
``pread`` adds only the rows themselves, and in the store benchmark it is faster than mapping and
releasing ("unmapped (pread, trainer)" in ``experiments/bench/bench_store.py``).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np
import torch

from interp.errors import StoreError
from interp.store import format as fmt

AVAILABLE = hasattr(os, "preadv")  # POSIX; elsewhere keep_pages=False stores memory-map their shards as usual


class FileRows:
    """A 2-D ``.npy`` shard file, read by row ranges with ``pread``."""

    def __init__(self, path: Path, storage: str):
        self.path, self.storage = path, storage
        with open(path, "rb") as handle:
            self.shape, np_dtype, self.offset = fmt.npy_header(handle, path)
        self.row_bytes = self.shape[1] * np_dtype.itemsize
        self.dtype = fmt.from_storage(np.empty((0, self.shape[1]), np_dtype), storage).dtype
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)  # also safe at interpreter exit, unlike __del__

    def __reduce__(self):  # a copy or a pickle opens the file again (never shares the descriptor)
        return FileRows, (self.path, self.storage)

    def read_into(self, out: torch.Tensor, rows: slice | np.ndarray) -> None:
        """Write the rows at a slice or at sorted local indices into ``out`` (contiguous, one row per
        index): one ``pread`` per run of consecutive rows."""
        count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        if out.dtype != self.dtype or tuple(out.shape) != (count, self.shape[1]) or not out.is_contiguous():
            raise ValueError(f"read_into needs a contiguous {self.dtype} tensor of shape ({count}, {self.shape[1]}), "
                             f"got {out.dtype} {tuple(out.shape)}")
        if count == 0:
            return
        if isinstance(rows, slice):
            firsts, starts, counts = [0], [rows.start], [count]
        else:
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            first = np.concatenate([[0], breaks])
            firsts, starts = first.tolist(), rows[first].tolist()
            counts = np.diff(np.concatenate([first, [len(rows)]])).tolist()
        buffer = memoryview(out.view(torch.uint8).numpy()).cast("B")
        for first, start, n in zip(firsts, starts, counts):
            self._read(buffer[first * self.row_bytes:(first + n) * self.row_bytes], self.offset + start * self.row_bytes)

    def _read(self, view: memoryview, position: int) -> None:
        while len(view):  # a single read returns at most about 2 GB
            got = os.preadv(self._fd, [view], position)
            if got <= 0:
                raise StoreError(f"{self.path} ended early (truncated?); run `interp store verify` on its store")
            view, position = view[got:], position + got
