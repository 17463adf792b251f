"""Reading a store: shards served as torch batches, in order or shuffled per token.

Local shards are memory-mapped, or with ``keep_pages=False`` read with ``pread`` (``file_rows.py``).
Many consumers may read one store at once (each opens its own files; the page cache is shared).
A ``Batches`` iterator has an ``epoch`` and a ``batch`` counter, saved with ``state_dict()`` and
restored with ``load_state_dict()``, so a trainer resumes on exactly the batch where it stopped.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import torch

from interp import distributed
from interp.errors import InputError, StoreError
from interp.store import format as fmt
from interp.store import file_rows, remote
from interp.store.file_rows import FileRows
from interp.store.shuffle import RowPermutation


class ActivationStore:
    """A store directory opened for reading (only shards recorded in the manifest are visible).

    ``root`` is a local folder or an fsspec URL (``s3://bucket/store``, ``file:///data/store``, ...):
    local folders are read from the files, other filesystems by byte ranges (``remote.py``).

    With ``keep_pages=True`` (the default) shards are memory-mapped and the pages read stay mapped,
    which is fastest when the same rows are read again, but the process's resident size grows
    towards the size of the store. With ``keep_pages=False`` rows are copied with ``pread`` into
    the tensor returned (``file_rows.py``) and nothing is mapped, so resident memory holds the rows
    asked for and no more, whatever the store's size: what a trainer reading a large store wants.
    (The data stay in the OS page cache either way. Without ``os.preadv``, e.g. on Windows, shards
    are memory-mapped as with ``keep_pages=True``.)
    """

    def __init__(self, root: str | Path, *, keep_pages: bool = True):
        self.fs, self.root = remote.locate(root)  # fs: None for a local folder, else an fsspec filesystem
        self.location = str(root) if self.fs is not None else str(self.root)  # what to open it again with
        self.keep_pages = keep_pages
        if self.fs is not None:
            self.manifest = remote.read_manifest(self.fs, self.root)
        elif not (self.root / fmt.MANIFEST).is_file():
            raise StoreError(f"{self.root} is not an activation store (no {fmt.MANIFEST})")
        else:
            try:
                self.manifest = fmt.read_manifest(self.root)
            except ValueError as err:
                raise StoreError(f"{self.root / fmt.MANIFEST} cannot be read: {err}") from err
        recorded = self.manifest["shards"]
        # A distributed harvest records shards out of order: the visible rows are those of shards
        # 0, 1, 2, ... up to the first gap, so a row's index never changes as the store fills.
        self.shards = recorded[: next((j for j, s in enumerate(recorded) if s["index"] != j), len(recorded))]
        self.dtype: str = self.manifest["dtype"]
        self.sites: list[str] = list(self.manifest["sites"])
        counts = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # global row index of each shard's start
        self._maps: dict[tuple[int, str], torch.Tensor | FileRows | remote.RangedArray] = {}

    # ------------------------------------------------------------ metadata
    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def d(self, site: str) -> int:
        return int(self.manifest["sites"][self.check_site(site)]["d"])

    def check_site(self, site: str) -> str:
        if site not in self.manifest["sites"]:
            import difflib

            close = difflib.get_close_matches(site, self.sites, n=3, cutoff=0.4)
            raise InputError(
                f"site {site!r} is not in the store {self.root}; it holds {', '.join(self.sites)}"
                + (f" (closest: {', '.join(close)})" if close else "")
            )
        return site

    def info(self) -> str:
        m = self.manifest
        item = fmt.STORAGE_DTYPES[self.dtype][1].itemsize
        size = sum(f["bytes"] for s in self.shards for f in s["files"].values())
        sites = "\n".join(f"  {name:36s} d={v['d']}" for name, v in m["sites"].items())
        state = "complete" if self.complete else "INCOMPLETE (run the same harvest command to resume)"
        return (
            f"store   {self.root}\nstate   {state}\nmodel   {m['model']['name']} ({m['model']['family']}, "
            f"{m['model']['n_layers']} layers)\ncorpus  {m['corpus']['name']} (digest {m['corpus']['digest'][:12]})\n"
            f"rows    {self.n_rows:,} in {len(self.shards)} shards; {m['contexts']['count']:,} contexts of "
            f"{m['context_len']} tokens, BOS {'excluded' if m['exclude_bos'] else 'included'}\n"
            f"dtype   {self.dtype} ({item} bytes), {size / 1e9:.2f} GB on disk\nsites\n{sites}"
        )

    # ------------------------------------------------------------- raw rows
    def _array(self, shard: int, name: str) -> torch.Tensor | FileRows | remote.RangedArray:
        """A shard file as a tensor over its memory map (torch copies/gathers are multi-threaded);
        with ``keep_pages=False`` as ``FileRows``; on a remote filesystem as a ``RangedArray``."""
        key = (shard, name)
        if key not in self._maps:
            record = self.shards[shard]
            filename = "rows.npy" if name == "rows" else fmt.site_file(name)
            path = fmt.shard_dir(self.root, record["index"]) / filename
            expected = record["files"][filename]["bytes"]
            size = self._size(path)
            if size != expected:
                got = "missing" if size is None else size
                raise StoreError(
                    f"shard {record['index']} of {self.root} is damaged: {filename} has {got} bytes, expected "
                    f"{expected}; run `interp store verify {self.root}`"
                )
            storage = "int32" if name == "rows" else self.dtype
            if self.fs is not None:
                self._maps[key] = remote.RangedArray(self.fs, path, storage)
            elif not self.keep_pages and file_rows.AVAILABLE:
                self._maps[key] = FileRows(path, storage)
            else:
                with warnings.catch_warnings():  # read-only map: we never write through it
                    warnings.simplefilter("ignore", UserWarning)
                    self._maps[key] = fmt.from_storage(_map_npy(path), storage)
        return self._maps[key]

    def _size(self, path: Path) -> int | None:
        """A file's size in bytes, None if it is missing."""
        if self.fs is None:
            return path.stat().st_size if path.is_file() else None
        try:
            return int(self.fs.size(str(path)))
        except FileNotFoundError:
            return None

    def rows(self, indices: np.ndarray | slice | None = None) -> np.ndarray:
        """Row metadata [n, 5] (context, position, token, document, document offset) for global rows."""
        return self._gather("rows", _as_indices(indices, self.n_rows)).numpy()

    def read(self, site: str, indices: np.ndarray | slice | None = None, *, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Activations [n, d] of ``site`` at global row ``indices`` (sorted indices read fastest)."""
        self.check_site(site)
        tensor = self._gather(site, _as_indices(indices, self.n_rows))
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def _gather(self, name: str, indices: np.ndarray | slice) -> torch.Tensor:
        """Rows ``indices`` of ``name`` in the caller's order, read in sorted order."""
        order = None
        if not isinstance(indices, slice):
            if indices.size and (indices.min() < 0 or indices.max() >= self.n_rows):
                raise InputError(f"row indices out of range for a store of {self.n_rows} rows")
            if indices.size > 1 and (np.diff(indices) < 0).any():
                order = np.argsort(indices, kind="stable")
                indices = indices[order]
        rows = self._copy_rows(name, indices)
        if order is None:
            return rows
        out = torch.empty_like(rows)
        out[torch.from_numpy(order)] = rows
        return out

    def _copy_rows(self, name: str, indices: np.ndarray | slice) -> torch.Tensor:
        """Rows at a slice or sorted, in-range ``indices``."""
        first_map = self._array(0, name)
        if isinstance(indices, slice):  # contiguous: one copy per shard touched
            start, stop = indices.start, indices.stop
            out = torch.empty((stop - start, first_map.shape[1]), dtype=first_map.dtype)
            shard, filled = int(np.searchsorted(self.offsets, start, side="right")) - 1, 0
            while filled < stop - start:
                lo = start + filled - int(self.offsets[shard])
                take = min(int(self.offsets[shard + 1]) - int(self.offsets[shard]) - lo, stop - start - filled)
                _read_into(self._array(shard, name), out[filled : filled + take], slice(lo, lo + take))
                filled, shard = filled + take, shard + 1
            return out
        # Sorted rows: each shard's rows are one contiguous run of `indices`, gathered in place.
        bounds = np.searchsorted(indices, self.offsets)
        out = torch.empty((len(indices), first_map.shape[1]), dtype=first_map.dtype)
        for shard in range(len(self.shards)):
            lo, hi = int(bounds[shard]), int(bounds[shard + 1])
            if hi > lo:
                _read_into(self._array(shard, name), out[lo:hi], indices[lo:hi] - self.offsets[shard])
        return out

    def batches(
        self,
        sites: str | Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        dtype: torch.dtype | None = torch.float32,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        rows: tuple[int, int] | None = None,
        split: str = "batches",
    ) -> Batches:
        """An iterator of batches (a tensor for one site, a dict aligned by row for several).

        ``rows=(start, stop)`` restricts it to a range of store rows (e.g. all but a held-out tail).
        With ``world_size > 1``, ``split="batches"`` gives each rank every ``world_size``-th batch;
        ``split="rows"`` gives every rank every batch, cut into ``world_size`` disjoint parts of its
        (sorted) rows, rank r reading part r: a data-parallel step over one global batch.
        """
        if split not in ("batches", "rows"):
            raise InputError(f"split={split!r}: choose batches or rows")
        names = [sites] if isinstance(sites, str) else list(sites)
        for name in names:
            self.check_site(name)
        if self.n_rows == 0:
            raise StoreError(f"{self.root} holds no complete shard yet")
        start, stop = rows if rows is not None else (0, self.n_rows)
        if not 0 <= start < stop <= self.n_rows:
            raise InputError(f"rows={rows}: the store has rows 0..{self.n_rows}")
        return Batches(self, names, batch_size, shuffle=shuffle, seed=seed, dtype=dtype, drop_last=drop_last,
                       single=isinstance(sites, str), rank=rank, world_size=world_size, start=start, stop=stop, split=split)

    def verify(self) -> list[str]:
        """Recompute every file's size and sha256; a list of problems (empty when intact)."""
        problems = []
        for record in self.shards:
            folder = fmt.shard_dir(self.root, record["index"])
            for filename, expected in record["files"].items():
                path = folder / filename
                size = self._size(path)
                if size is None:
                    problems.append(f"shard {record['index']}: {filename} is missing")
                elif size != expected["bytes"]:
                    problems.append(f"shard {record['index']}: {filename} has {size} bytes, expected {expected['bytes']}")
                elif (remote.sha256(self.fs, path) if self.fs is not None else fmt.sha256_file(path)) != expected["sha256"]:
                    problems.append(f"shard {record['index']}: {filename} does not match its checksum")
        return problems


def _map_npy(path: Path) -> np.ndarray:
    """A read-only memory map of a 2-D ``.npy`` file (the array holds the map open)."""
    with open(path, "rb") as handle:
        shape, dtype, offset = fmt.npy_header(handle, path)
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.ndarray(shape, dtype=dtype, buffer=mapping, offset=offset)


def _read_into(array: torch.Tensor | FileRows | remote.RangedArray, out: torch.Tensor, local: slice | np.ndarray) -> None:
    """Copy a shard's rows at a slice or sorted local indices into ``out``."""
    if isinstance(array, FileRows):
        array.read_into(out, local)
    elif isinstance(local, slice):
        out.copy_(array[local])
    elif isinstance(array, remote.RangedArray):
        out.copy_(array.take(local))
    else:
        torch.index_select(array, 0, torch.from_numpy(local), out=out)


def _as_indices(indices: np.ndarray | slice | None, n: int) -> np.ndarray | slice:
    if indices is None:
        return slice(0, n)
    if isinstance(indices, slice):
        start, stop, step = indices.indices(n)
        return slice(start, stop) if step == 1 else np.arange(start, stop, step)
    return np.asarray(indices, dtype=np.int64)


class Batches:
    """Epoch-aware batch iterator over a store (see ``ActivationStore.batches``).

    Shuffling is per token: each epoch visits every row exactly once, in the order of a keyed
    bijection of the row indices drawn from ``(seed, epoch)`` (``RowPermutation``: computed for
    one batch's positions at a time, so starting an epoch costs no memory or time whatever the
    number of rows); each batch is read in sorted row order (fast file access) and
    returned in that order, the same on every run. With ``world_size > 1`` each rank gets every
    ``world_size``-th batch (``split="batches"``) or its part of every batch (``split="rows"``).
    """

    WINDOW = 16  # batches of shuffled positions computed at once

    def __init__(self, store: ActivationStore, sites: list[str], batch_size: int, *, shuffle: bool, seed: int,
                 dtype: torch.dtype | None, drop_last: bool, single: bool, rank: int, world_size: int, start: int, stop: int,
                 split: str = "batches"):
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        self.store, self.sites, self.batch_size = store, sites, batch_size
        self.start, self.n_rows = start, stop - start
        self.shuffle, self.seed, self.dtype, self.drop_last, self.single = shuffle, seed, dtype, drop_last, single
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size, self.split = rank, world_size, split
        self.epoch, self.batch = 0, 0
        self._order: RowPermutation | None = None
        self._order_epoch = -1
        self._window = (0, 0, np.empty(0, dtype=np.int64))  # (first, end, rows) of the epoch positions computed ahead

    def _total(self) -> int:
        n = self.n_rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _mine(self) -> range:
        """The batch numbers this rank reads in an epoch."""
        return range(self._total()) if self.split == "rows" else range(self.rank, self._total(), self.world_size)

    def __len__(self) -> int:
        """Batches per epoch (for this rank)."""
        return len(self._mine())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "batch_size"):
            if state[key] != getattr(self, key):
                raise InputError(f"cannot resume: the saved reader had {key}={state[key]}, this one has {getattr(self, key)}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _epoch_order(self) -> RowPermutation:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = RowPermutation(self.n_rows, [self.seed, self.epoch]), self.epoch
            self._window = (0, 0, np.empty(0, dtype=np.int64))
        return self._order

    def _shuffled(self, start: int, stop: int) -> np.ndarray:
        """Epoch positions ``[start, stop)`` through the bijection, computed ``WINDOW`` batches at a time
        (the per-call cost of the rounds is then shared; 16 batches of 4,096 rows are 512 KB)."""
        order = self._epoch_order()
        lo, hi, rows = self._window
        if not (lo <= start and stop <= hi):
            lo, hi = start, min(self.n_rows, start + self.WINDOW * self.batch_size)
            rows = order[lo:max(hi, stop)]
            self._window = (lo, lo + len(rows), rows)
        return rows[start - lo:stop - lo]

    def rows_of(self, index: int) -> np.ndarray | slice:
        """The global store rows of batch ``index`` of the current epoch that this rank reads (sorted)."""
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.n_rows)
        if self.shuffle:
            rows = np.sort(self._shuffled(start, stop)) + self.start
        else:
            rows = slice(self.start + start, self.start + stop)
        if self.split == "rows" and self.world_size > 1:
            lo, hi = distributed.shares(stop - start, self.world_size)[self.rank]
            rows = rows[lo:hi] if isinstance(rows, np.ndarray) else slice(rows.start + lo, rows.start + hi)
        return rows

    def read_batch(self, index: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Batch ``index`` of the current epoch."""
        rows = self.rows_of(index)
        out = {site: self.store.read(site, rows, dtype=self.dtype) for site in self.sites}
        return out[self.sites[0]] if self.single else out

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Yield the rest of the current epoch, then move to the next epoch."""
        mine = self._mine()
        while self.batch < len(mine):
            batch = self.read_batch(mine[self.batch])
            self.batch += 1
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0
