"""``load_model``: one entry point for every way a user has a model at hand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.errors import ModelNotFoundError
from interp.models.arch import arch_for
from interp.models.embedded import EMBEDDED, embedded_model_folder
from interp.models.model import HFModel, Model, ModelConfig, TLModel
from interp.models.sites import hf_site_table, tl_site_table


def load_model(
    spec: str | Path | nn.Module | Model,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Model:
    """Load a model from any of:

    - the name of an embedded default (``"smollm2-135m"``; weights from an installed package),
    - a local folder in HF format,
    - a HF hub id (needs network access to the hub),
    - a ready ``transformers`` model or TransformerLens ``HookedTransformer`` object (wrapped
      as is: same weights, same module tree),
    - ``"tiny:<family>"``: a tiny random-weight model for tests (see ``tiny_model``).

    Loaded weights are float32 unless ``dtype`` says otherwise; objects keep their dtype.
    """
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, nn.Module):
        module = spec if device is None else spec.to(device)
        module = module if dtype is None else module.to(dtype)
        return wrap_module(module, tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(spec)
    if text.startswith("tiny:"):
        from interp.models.tiny import tiny_model

        return tiny_model(text.removeprefix("tiny:"))
    if text.lower() in EMBEDDED:
        source, name = embedded_model_folder(text.lower()), text.lower()
    elif Path(text).expanduser().is_dir():
        source, name = Path(text).expanduser(), Path(text).name
    else:
        source, name = text, text
    try:
        with _quiet_loading(local=source is not text):
            module = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if source is text:
            raise ModelNotFoundError(
                f"could not load model {text!r}: it is not an embedded model "
                f"({', '.join(EMBEDDED)}), not a local folder, and the HF hub could not provide it "
                f"({err})"
            ) from err
        raise
    if device is not None:
        module = module.to(device)
    return wrap_module(module, tokenizer, name=name)


def wrap_module(module: nn.Module, tokenizer: Any = None, *, name: str | None = None) -> Model:
    """Wrap a ``transformers`` causal LM or a TransformerLens model without copying it."""
    module.eval()
    if hasattr(module, "hook_dict") and hasattr(module, "cfg"):
        return _wrap_transformer_lens(module, tokenizer or getattr(module, "tokenizer", None), name)
    if not hasattr(module, "config"):
        raise TypeError(
            f"cannot wrap {type(module).__name__}: expected a transformers causal LM or a "
            "TransformerLens HookedTransformer"
        )
    arch = arch_for(module)
    name = name or getattr(module.config, "name_or_path", "") or type(module).__name__
    layer0 = module.get_submodule(arch.layers)[0]
    config = module.config
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    attn_width = _in_features(layer0.get_submodule(arch.attn_out_proj))
    cfg = ModelConfig(
        name=name,
        family=arch.family,
        backend="hf",
        n_layers=len(module.get_submodule(arch.layers)),
        d_model=module.get_submodule(arch.embed).weight.shape[1],
        d_mlp=_in_features(layer0.get_submodule(arch.mlp_out_proj)),
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        d_head=attn_width // n_heads,
        d_vocab=module.get_output_embeddings().weight.shape[0],
    )
    dims = {"d_model": cfg.d_model, "d_mlp": cfg.d_mlp, "n_heads": n_heads, "d_head": cfg.d_head}
    return HFModel(module, tokenizer, cfg, hf_site_table(module, arch, dims, name), arch)


def _wrap_transformer_lens(module: nn.Module, tokenizer: Any, name: str | None) -> Model:
    c = module.cfg
    name = name or c.model_name
    cfg = ModelConfig(
        name=name,
        family=f"transformer_lens:{c.original_architecture or 'custom'}",
        backend="transformer_lens",
        n_layers=c.n_layers,
        d_model=c.d_model,
        d_mlp=c.d_mlp or 0,
        n_heads=c.n_heads,
        n_kv_heads=c.n_key_value_heads or c.n_heads,
        d_head=c.d_head,
        d_vocab=c.d_vocab,
    )
    return TLModel(module, tokenizer, cfg, tl_site_table(module, name))


@contextlib.contextmanager
def _quiet_loading(local: bool) -> Iterator[None]:
    """No per-tensor progress bar for local loads: they take well under a second."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if local:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and was_enabled:
            hf_logging.enable_progress_bar()


def _in_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return int(layer.weight.shape[0])  # transformers' Conv1D stores (in, out)
