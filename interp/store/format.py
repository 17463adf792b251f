"""The on-disk format of an activation store (documented in the README, readable without interp).

```
STORE/
  manifest.json                 identity (model, tokenizer, corpus, contexts, sites, dtype) + shard list
  shards/00000/rows.npy         int32 [rows, 5]: context, position, token id, document id, document offset
  shards/00000/<site>.npy       [rows, d] activations, one file per site, rows aligned with rows.npy
  shards/00001/...
```

Every ``.npy`` file is a plain NumPy array (memory-mappable). ``bfloat16`` has no NumPy type, so
bfloat16 stores hold ``uint16`` arrays with the bfloat16 bit patterns (``manifest["dtype"]``
says so). A shard directory is written under a temporary name and renamed when complete, and
the manifest (rewritten atomically) lists only complete shards with their row counts and the
sha256 of every file. ``writer.lock`` is the advisory lock a writer holds (readers never take it);
``manifest.lock`` serialises the manifest updates of the ranks of a distributed harvest. The
shards of a distributed harvest may be recorded out of order: readers see the shards numbered
0, 1, 2, ... up to the first one missing (all of them once the store is complete).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from interp.errors import StoreError
from interp.paths import write_json

FORMAT = "interp-activation-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = "writer.lock"
MANIFEST_LOCK = "manifest.lock"
ROW_COLUMNS = ("context", "position", "token", "document", "document_offset")

STORAGE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),  # bit patterns; see module docstring
}


def shard_dir(root: Path, index: int) -> Path:
    return root / "shards" / f"{index:05d}"


def site_file(site: str) -> str:
    return f"{site}.npy"


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A [rows, d] tensor as the NumPy array stored for ``dtype``."""
    torch_dtype, np_dtype = STORAGE_DTYPES[dtype]
    converted = values.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bfloat16":
        return converted.view(torch.int16).numpy().view(np_dtype)
    return converted.numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The stored NumPy rows as a torch tensor of the storage dtype (no copy)."""
    if dtype == "int32":  # the row table
        return torch.from_numpy(array)
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def npy_header(handle: BinaryIO, where: object) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the C-ordered 2-D ``.npy`` file ``where``, open in ``handle`` at its start."""
    try:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
    except ValueError as err:
        raise StoreError(f"{where}: {err}") from err
    if fortran_order or len(shape) != 2:
        raise StoreError(f"{where}: expected a C-ordered 2-D array, found shape {shape} (Fortran order: {fortran_order})")
    return shape, dtype, handle.tell()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    with open(root / MANIFEST) as handle:
        manifest = json.load(handle)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{root / MANIFEST} is not an interp activation-store manifest")
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (readers see the old one or the new one, never a mix)."""
    write_json(root / MANIFEST, manifest)
