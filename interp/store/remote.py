"""Reading a store through an fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``, ...).

Local folders and ``file://`` URLs are memory-mapped as always. Any other filesystem is read with
ranged reads: the ``.npy`` header once per file, then only the byte ranges of the rows asked for
(a contiguous run of rows is one range; a shuffled batch, sorted, becomes one range per run of
nearby rows, fetched together with ``cat_ranges``, which concurrent filesystems such as s3fs and
HTTP serve in parallel). Writing a store needs a local (POSIX) folder: atomic renames and
advisory locks have no equivalent on object stores. The filesystem's package (``s3fs``,
``gcsfs``, ...) must be installed; fsspec itself comes with torch.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from interp.errors import StoreError
from interp.store import format as fmt

GAP_BYTES = 1 << 16  # rows this close together are fetched in one range (a request costs more than 64 kB)


def locate(root: str | Path) -> tuple[Any, Path | PurePosixPath]:
    """(filesystem or None for a local folder, path): ``None`` means memory-map as usual."""
    text = str(root)
    if "://" not in text:
        return None, Path(text)
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = url_to_fs(text)
    except (ImportError, ValueError) as err:  # an unknown protocol or its package missing
        raise StoreError(f"cannot open {text}: {err}") from err
    return (None, Path(path)) if isinstance(fs, LocalFileSystem) else (fs, PurePosixPath(path))


def read_manifest(fs: Any, root: PurePosixPath) -> dict[str, Any]:
    try:
        manifest = json.loads(fs.cat_file(str(root / fmt.MANIFEST)))
    except FileNotFoundError:
        raise StoreError(f"{root} is not an activation store (no {fmt.MANIFEST})") from None
    if manifest.get("format") != fmt.FORMAT:
        raise StoreError(f"{root / fmt.MANIFEST} is not an interp activation-store manifest")
    return manifest


def sha256(fs: Any, path: PurePosixPath) -> str:
    digest = hashlib.sha256()
    with fs.open(str(path), "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class RangedArray:
    """A 2-D ``.npy`` file read by byte ranges, as torch tensors of the store's dtype."""

    def __init__(self, fs: Any, path: PurePosixPath, storage: str):
        self.fs, self.path, self.storage = fs, str(path), storage
        head = fs.cat_file(self.path, 0, 4096)
        shape, self.np_dtype, self.offset = fmt.npy_header(io.BytesIO(head), self.path)
        self.n_rows, self.width = shape
        self.row_bytes = self.width * self.np_dtype.itemsize
        self.shape = (self.n_rows, self.width)
        self.dtype = self._tensor(np.empty((0, self.width), self.np_dtype)).dtype

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return fmt.from_storage(array, self.storage)

    def _rows(self, data: bytes, n: int) -> np.ndarray:
        return np.frombuffer(data, dtype=self.np_dtype, count=n * self.width).reshape(n, self.width)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.n_rows)
        data = self.fs.cat_file(self.path, self.offset + start * self.row_bytes, self.offset + stop * self.row_bytes)
        return self._tensor(self._rows(data, stop - start).copy())

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """Rows at sorted local indices ``rows``: one ranged read per run of nearby rows."""
        gap = max(1, GAP_BYTES // self.row_bytes)
        breaks = np.flatnonzero(np.diff(rows) > gap) + 1
        firsts = np.concatenate([[0], breaks])
        lasts = np.concatenate([breaks, [len(rows)]]) - 1
        starts, stops = rows[firsts], rows[lasts] + 1
        chunks = self.fs.cat_ranges([self.path] * len(starts), (self.offset + starts * self.row_bytes).tolist(),
                                    (self.offset + stops * self.row_bytes).tolist(), on_error="raise")
        out = np.empty((len(rows), self.width), dtype=self.np_dtype)
        for first, last, begin, end, data in zip(firsts, lasts, starts, stops, chunks):
            out[first: last + 1] = self._rows(data, end - begin)[rows[first: last + 1] - begin]
        return self._tensor(out)
