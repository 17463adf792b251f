"""Saving and loading dictionaries: our own format, and SAELens's (both directions).

Own format: a folder with ``dictionary.safetensors`` (parameters and buffers) and
``dictionary.json`` (``{"format": "interp-dictionary", "config": {...}, ...}``), each written
atomically (``interp.paths.atomic_write``), so a crash never leaves a half-written file under the
real name; the SAELens export folder is written whole and renamed into place.

SAELens format: ``cfg.json`` + ``sae_weights.safetensors``, written here as SAELens's own classes
write them (tested against them) and read with SAELens, so ``sae_lens.SAE.load_from_disk`` loads
what we export. Input normalisation is folded into the weights on export, and so is a transcoder's
``b_dec`` subtraction (SAELens's transcoders have none). Mapping: topk -> "topk"; relu ->
"standard" (SAE) / "transcoder"; jumprelu -> "jumprelu" / "jumprelu_transcoder"; batchtopk ->
JumpReLU with its inference threshold on every latent (what BatchTopK computes at inference).
SAELens has no TopK transcoder.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from interp.dictionary.sae import DictionaryConfig, SparseDictionary
from interp.errors import InputError
from interp.paths import atomic_directory, atomic_write, read_format_json, write_json

WEIGHTS, META = "dictionary.safetensors", "dictionary.json"
FORMAT = "interp-dictionary"


def save_dictionary(dictionary: SparseDictionary, folder: str | Path, **extra: Any) -> Path:
    """Write ``dictionary`` (and any JSON-able ``extra`` fields) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in dictionary.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    meta = {"format": FORMAT, "version": 1, "config": dataclasses.asdict(dictionary.config), **extra}
    write_json(folder / META, meta)
    return folder


def load_dictionary(folder: str | Path, *, d_in: int | None = None) -> SparseDictionary:
    """Load a folder written by ``save_dictionary``; ``d_in`` checks the input width if given."""
    folder = Path(folder)
    meta = read_format_json(folder, META, FORMAT, "an interp dictionary")
    config = DictionaryConfig(**meta["config"])
    _check_width(config, d_in, folder)
    dictionary = SparseDictionary(config)
    dictionary.load_state_dict(load_file(str(folder / WEIGHTS)))
    return dictionary


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META).read_text())


def _check_width(config: DictionaryConfig, d_in: int | None, where: Path) -> None:
    if d_in is not None and config.d_in != d_in:
        raise InputError(f"{where}: the dictionary reads vectors of width {config.d_in}, but the site has width {d_in}")


# ------------------------------------------------------------------ SAELens


def export_saelens(dictionary: SparseDictionary, folder: str | Path) -> Path:
    """Write ``dictionary`` in SAELens's format: ``cfg.json`` as SAELens's config classes write it, and
    ``sae_weights.safetensors``.

    Written here without importing SAELens, whose import (with transformers and datasets) was the
    largest memory cost of the trainer's last phase; ``tests/test_dictionary.py`` checks the files
    against SAELens's own writer, and loads them with SAELens.
    """
    d = copy.deepcopy(dictionary).float()
    c = d.config
    apply_b_dec_to_input = c.subtract_b_dec
    if c.is_transcoder and c.subtract_b_dec:  # SAELens's transcoders never subtract b_dec: fold it into b_enc
        with torch.no_grad():  # before the scales are folded: b_dec is in the output's scale, the encoder in the input's
            d.b_enc -= d.W_enc @ d.b_dec
        apply_b_dec_to_input = False
    d.fold_scaling()
    weights = {"W_enc": d.W_enc.detach().T.contiguous(), "b_enc": d.b_enc.detach(),
               "W_dec": d.W_dec.detach().contiguous(), "b_dec": d.b_dec.detach()}
    extra: dict[str, Any] = {"d_out": c.out_dim} if c.is_transcoder else {}
    if c.architecture == "topk":
        if c.is_transcoder:
            raise InputError("SAELens has no TopK transcoder architecture; export the transcoder with interp's own format")
        extra.update(k=c.k, rescale_acts_by_decoder_norm=False)
        architecture = "topk"
    elif c.architecture == "relu":
        architecture = "transcoder" if c.is_transcoder else "standard"
    else:  # jumprelu, or batchtopk as a JumpReLU with one threshold everywhere
        threshold = d.log_threshold.detach().exp() if c.architecture == "jumprelu" else d.threshold.expand(c.n_latents)
        weights["threshold"] = threshold.clone().contiguous()
        architecture = "jumprelu_transcoder" if c.is_transcoder else "jumprelu"
    version = importlib.metadata.version("sae_lens")
    config = {
        "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": version, "sae_lens_training_version": version, "model_name": c.model,
                     "hook_name": c.input_site, "hook_name_out": c.output_site or c.input_site, "exported_by": "interp"},
        **extra, "architecture": architecture,
    }
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        save_file(weights, tmp / "sae_weights.safetensors")
        (tmp / "cfg.json").write_text(json.dumps(config))
    return folder


def import_saelens(folder: str | Path, *, d_in: int | None = None) -> SparseDictionary:
    """Load a SAELens-format folder (``cfg.json`` + ``sae_weights.safetensors``) as a SparseDictionary."""
    from sae_lens import SAE

    folder = Path(folder)
    if not (folder / "cfg.json").is_file():
        raise InputError(f"{folder} is not a SAELens SAE folder (no cfg.json)")
    sae = SAE.load_from_disk(str(folder), device="cpu")
    cfg = sae.cfg
    arch = cfg.architecture()
    if cfg.normalize_activations != "none":
        raise InputError(f"{folder}: SAELens normalize_activations={cfg.normalize_activations!r} is not supported")
    kinds = {"topk": "topk", "standard": "relu", "transcoder": "relu", "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu"}
    if arch not in kinds:
        raise InputError(f"{folder}: SAELens architecture {arch!r} is not supported (supported: {', '.join(kinds)})")
    meta = cfg.metadata
    transcoder = "transcoder" in arch
    hook_in = meta.hook_name or ""
    hook_out = (meta.hook_name_out or "") if transcoder else ""
    config = DictionaryConfig(
        d_in=cfg.d_in, n_latents=cfg.d_sae, architecture=kinds[arch], k=getattr(cfg, "k", 32),
        d_out=getattr(cfg, "d_out", None), input_site=hook_in, output_site=hook_out or (f"{hook_in}:output" if transcoder else ""),
        model=meta.model_name or "", subtract_b_dec=bool(cfg.apply_b_dec_to_input),
        metadata={"imported_from": str(folder), "saelens_architecture": arch},
    )
    _check_width(config, d_in, folder)
    dictionary = SparseDictionary(config)
    state = sae.state_dict()
    with torch.no_grad():
        dictionary.W_enc.copy_(state["W_enc"].T)
        dictionary.b_enc.copy_(state["b_enc"])
        dictionary.W_dec.copy_(state["W_dec"])
        dictionary.b_dec.copy_(state["b_dec"])
        if config.architecture == "jumprelu":
            dictionary.log_threshold.copy_(state["threshold"].clamp_min(1e-12).log())
    return dictionary


__all__ = ["export_saelens", "import_saelens", "load_dictionary", "read_meta", "save_dictionary"]
