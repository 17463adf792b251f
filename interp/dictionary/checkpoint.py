"""Training checkpoints: versioned folders named by an atomically replaced pointer file.

```
RUN/
  checkpoint.json                 {"format": "interp-checkpoint", "step": 12, "folder": "checkpoints/step-00000012"}
  checkpoints/step-00000012/      <dictionary>.safetensors (weights, Adam state, since_fired) + state.json
```

Saving writes the new version under a temporary name (every file and the folder flushed to disk;
in a dictionary-parallel run every rank writes its own dictionaries' files there),
renames it into place, replaces the pointer (write, flush, rename, flush the folder) and only then
deletes older versions. Whenever the process dies, the pointer names a complete version, the old
one or the new one, and ``--resume`` continues from it. What a crash leaves behind (a temporary
folder, a version the pointer does not name) is deleted by the next save; the caller holds the
run's lock, so no live writer's files are touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from interp.distributed import SINGLE, Ranks
from interp.errors import InputError
from interp.faults import fault_point
from interp.paths import fsync_path, write_json

POINTER = "checkpoint.json"
VERSIONS = "checkpoints"
FORMAT = "interp-checkpoint"


def exists(run: Path) -> bool:
    """Whether ``run`` holds a checkpointed run. Only the pointer counts: a run killed during its
    first save leaves a version folder without one, and starting again in ``run`` clears it."""
    return (run / POINTER).exists()


def save(run: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any], *,
         ranks: Ranks = SINGLE) -> Path:
    """Write one version ({file stem: tensors} + state.json) and make it the current checkpoint.

    With several ``ranks`` (a dictionary-parallel run, every rank calling this) each rank writes its
    own ``tensors`` into one temporary folder, and rank 0, once all have flushed theirs, adds
    state.json and completes the version as above.
    """
    versions = run / VERSIONS
    folder = versions / f"step-{step:08d}"
    staging = versions / f".{folder.name}.staging"
    if ranks.is_main:
        for leftover in (folder, staging):  # left by a crash before the pointer named them (never the current one)
            if leftover.exists():
                shutil.rmtree(leftover)
        staging.mkdir(parents=True)
    ranks.barrier()
    try:
        for name, values in tensors.items():
            save_file(values, str(staging / f"{name}.safetensors"))
            fsync_path(staging / f"{name}.safetensors")
            fault_point("checkpoint.file-written")
        ranks.barrier()
        if ranks.is_main:
            (staging / "state.json").write_text(json.dumps(state))
            fsync_path(staging / "state.json")
            fsync_path(staging)
            fault_point("checkpoint.files-written")
            os.replace(staging, folder)
            fsync_path(versions)
    except BaseException:
        if not ranks.active:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    fault_point("checkpoint.renamed")
    if not ranks.is_main:
        ranks.barrier()
        return folder
    write_json(run / POINTER, {"format": FORMAT, "step": step, "folder": f"{VERSIONS}/{folder.name}"})
    fault_point("checkpoint.pointer-replaced")
    for old in sorted(versions.iterdir()):
        if old != folder:
            shutil.rmtree(old)
            fault_point("checkpoint.old-removed")
    ranks.barrier()
    return folder


def load(run: Path) -> tuple[Path, dict[str, Any]]:
    """The current version's folder and its state.json."""
    pointer = run / POINTER
    if not pointer.is_file():
        raise InputError(f"--resume: {run} holds no checkpoint ({POINTER} is missing: the run stopped before its first "
                         "checkpoint was complete); run the same command without --resume to start it again")
    record = json.loads(pointer.read_text())
    if record.get("format") != FORMAT:
        raise InputError(f"{pointer} is not an interp checkpoint pointer")
    folder = run / record["folder"]
    return folder, json.loads((folder / "state.json").read_text())


def load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{name}.safetensors"))
