"""Models too large for this machine, run on NDIF's servers through nnsight's remote execution.

``RemoteModel("meta-llama/Llama-3.1-70B")`` builds nnsight's ``LanguageModel`` (only the config and
tokenizer are downloaded; the weights stay on meta tensors here) and ``run_with_cache(prompts,
sites)`` reads the sites inside ``trace(..., remote=True)``: the intervention graph runs on the
server and only the saved tensors come back. An NDIF API key is needed (``NDIF_API_KEY`` or
``nnsight.CONFIG.set_default_api_key``); without one the constructor stops before any download.

The sites served remotely are the ones that are plain module inputs/outputs in the family table
(``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``, ``mlp_post``, by TransformerLens names).
Norm sites are found locally by following tensors through a forward pass (``structure.py``),
which meta weights cannot run, so they are refused here.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import torch

from interp.errors import InputError, UnknownSiteError
from interp.models.arch import ARCHS, discover_components

# kind -> (module relative to a decoder layer, by component name; "input" or "output"), in the
# order a forward pass reaches them (nnsight serves requests in that order only)
_KINDS = {
    "hook_resid_pre": ("", "input"),
    "hook_attn_out": ("attn", "output"),
    "mlp.hook_post": ("mlp_out_proj", "input"),
    "hook_mlp_out": ("mlp", "output"),
    "hook_resid_post": ("", "output"),
}


class RemoteModel:
    """A causal LM on NDIF, read through nnsight (see the module docstring)."""

    def __init__(self, repo_id: str, *, api_key: str | None = None, **language_model: Any):
        import nnsight

        key = api_key or os.environ.get("NDIF_API_KEY") or nnsight.CONFIG.API.APIKEY
        if not key:
            raise InputError("remote execution needs an NDIF API key: set NDIF_API_KEY, pass api_key=..., or run "
                             "nnsight.CONFIG.set_default_api_key(KEY) once")
        nnsight.CONFIG.API.APIKEY = key  # nnsight's remote backend reads it from its config
        self.lm = nnsight.LanguageModel(repo_id, **language_model)
        module = self.lm._module
        family = getattr(module.config, "model_type", None)
        self.components = ARCHS[family] if family in ARCHS else discover_components(module)
        self.n_layers = len(module.get_submodule(self.components.layers))
        self.name = repo_id

    def site_names(self, pattern: str = "*") -> list[str]:
        """The sites served remotely whose names match the glob ``pattern``, in forward order."""
        names = [f"blocks.{layer}.{kind}" for layer in range(self.n_layers) for kind in _KINDS]
        return [name for name in names if fnmatch.fnmatchcase(name, pattern)]

    def module_of(self, site: str) -> tuple[str, str]:
        """(module path, "input" or "output") of a site."""
        layer, _, kind = site.removeprefix("blocks.").partition(".")
        if not site.startswith("blocks.") or not layer.isdigit() or kind not in _KINDS or int(layer) >= self.n_layers:
            raise UnknownSiteError(f"site {site!r} cannot be read remotely; the remote sites are blocks.L.<kind> for L in "
                                   f"0..{self.n_layers - 1} and kind in {', '.join(_KINDS)} (norm sites need a local forward)")
        component, which = _KINDS[kind]
        relative = getattr(self.components, component) if component else ""
        return ".".join(p for p in (self.components.layers, layer, relative) if p), which

    def _envoy(self, path: str) -> Any:
        envoy = self.lm
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def run_with_cache(self, prompts: str | list[str], sites: str | list[str], *, remote: bool = True) -> dict[str, torch.Tensor]:
        """{site: [batch, pos, d]} for ``prompts``; ``sites`` is a list or a glob (``blocks.*.hook_resid_post``)."""
        names = self.site_names(sites) if isinstance(sites, str) else list(sites)
        if not names:
            raise UnknownSiteError(f"no remote site matches {sites!r}; e.g. {', '.join(self.site_names()[:5])}")
        where = {name: self.module_of(name) for name in names}  # every name checked before the request
        order = {name: i for i, name in enumerate(self.site_names())}
        where = dict(sorted(where.items(), key=lambda item: order[item[0]]))
        import nnsight

        saved = {}
        with self.lm.trace(prompts, remote=remote):
            for name, (path, which) in where.items():
                value = getattr(self._envoy(path), which)
                saved[name] = nnsight.save(value[0] if isinstance(value, tuple) else value)
        return {name: torch.as_tensor(value) for name, value in saved.items()}


__all__ = ["RemoteModel"]
