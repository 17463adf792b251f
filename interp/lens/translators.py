"""Affine lenses: one map per residual site, applied before the model's own readout.

- tuned lens (Belrose et al.): ``h -> h + h A^T + b`` with ``A = 0, b = 0`` at the start, so an
  untrained tuned lens is the logit lens; trained on KL to the final distribution;
- linear-map lens ("Jump to Conclusions", Din et al.): ``h -> h A^T + b`` fitted by least squares
  from layer l's residual to the last layer's.

Saved as ``lens.safetensors`` (weight [sites, d, d], bias [sites, d]) + ``lens.json`` (kind,
sites, model name and weights fingerprint, training record). Loading for a model checks the
fingerprint, so a lens is never applied to a model it was not made for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interp.errors import InputError

if TYPE_CHECKING:
    from interp.models.model import Model

LENS_KINDS = ("logit", "tuned", "linear")
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
WEIGHTS, META = "lens.safetensors", "lens.json"


def resid_sites(model: Model, site: str = "resid_post", layers: Sequence[int] | None = None) -> list[str]:
    """Residual-stream site names of one kind at ``layers`` (default: all), validated.

    ``site`` is a kind (``resid_post``) or, with ``layers=None``, one full site name.
    """
    n = model.cfg.n_layers
    if site.startswith("blocks.") or site in model.site_table:
        info = model.site_table.info(site)
        if info.kind not in RESID_KINDS:
            raise InputError(f"{site} is a {info.kind} site; a lens reads the residual stream: {', '.join(RESID_KINDS)}")
        return [site]
    if site not in RESID_KINDS:
        raise InputError(f"site kind {site!r}: a lens reads the residual stream, choose one of {', '.join(RESID_KINDS)}")
    layers = list(range(n)) if layers is None else [int(layer) for layer in layers]
    for layer in layers:
        if not 0 <= layer < n:
            raise InputError(f"layer {layer} is out of range: {model.cfg.name} has layers 0..{n - 1}")
    if not layers:
        raise InputError("no layers given")
    if not all(model.site_table.has(site, layer) for layer in layers):
        raise InputError(f"{model.cfg.name} has no {site} site (parallel attention and MLP have no resid_mid)")
    return [model.site(site, layer) for layer in layers]


def final_site(model: Model) -> str:
    """The last residual stream (what the final norm and unembedding read)."""
    return model.site("resid_post", model.cfg.n_layers - 1)


def model_fingerprint(model: Model) -> str:
    from interp.store.write import weights_fingerprint

    return weights_fingerprint(model.module)


class AffineLens(nn.Module):
    """One affine translator per residual site (see the module docstring)."""

    def __init__(self, kind: str, sites: Sequence[str], d_model: int, *, model_name: str, fingerprint: str,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if kind not in ("tuned", "linear"):
            raise InputError(f"lens kind {kind!r}: an affine lens is 'tuned' or 'linear'")
        self.kind, self.sites, self.d_model = kind, list(sites), d_model
        self.model_name, self.fingerprint = model_name, fingerprint
        self.meta: dict[str, Any] = dict(meta or {})
        eye = torch.eye(d_model).expand(len(self.sites), d_model, d_model)
        self.weight = nn.Parameter(torch.zeros(len(self.sites), d_model, d_model) if kind == "tuned" else eye.clone())
        self.bias = nn.Parameter(torch.zeros(len(self.sites), d_model))

    @classmethod
    def identity(cls, model: Model, sites: Sequence[str], kind: str = "tuned") -> AffineLens:
        """A lens that changes nothing (the logit lens), ready to train or fit."""
        return cls(kind, sites, model.cfg.d_model, model_name=model.cfg.name, fingerprint=model_fingerprint(model))

    def index(self, site: str) -> int:
        if site not in self.sites:
            raise InputError(f"this {self.kind} lens has no translator for {site}; it covers {self.sites[0]} .. {self.sites[-1]} ({len(self.sites)} sites)")
        return self.sites.index(site)

    def translate(self, h: torch.Tensor, site: str) -> torch.Tensor:
        """The translated residual [..., d] (float32)."""
        i = self.index(site)
        mapped = torch.nn.functional.linear(h.float(), self.weight[i], self.bias[i])
        return h.float() + mapped if self.kind == "tuned" else mapped

    def check_model(self, model: Model) -> None:
        """Refuse a model other than the one the lens was made for."""
        if model.cfg.d_model != self.d_model or model_fingerprint(model) != self.fingerprint:
            raise InputError(
                f"this {self.kind} lens was made for {self.model_name!r} (weights fingerprint {self.fingerprint[:12]}), "
                f"not for {model.cfg.name!r} ({model_fingerprint(model)[:12]}); train or fit one for this model"
            )

    def save(self, folder: str | Path) -> Path:
        """Write ``lens.safetensors`` + ``lens.json`` into ``folder`` (atomically)."""
        from safetensors.torch import save_file

        from interp.paths import atomic_directory

        folder = Path(folder)
        meta = {"kind": self.kind, "sites": self.sites, "d_model": self.d_model, "model": self.model_name,
                "fingerprint": self.fingerprint, **self.meta}
        with atomic_directory(folder) as tmp:
            save_file({"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()}, tmp / WEIGHTS)
            (tmp / META).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: Model | None = None) -> AffineLens:
        """Load a saved lens; with ``model`` it must be the model the lens was made for."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
            raise InputError(f"{folder} is not a saved lens (expected {WEIGHTS} and {META}); make one with `interp lens train`")
        meta = json.loads((folder / META).read_text())
        tensors = load_file(folder / WEIGHTS)
        known = ("kind", "sites", "d_model", "model", "fingerprint")
        lens = cls(meta["kind"], meta["sites"], meta["d_model"], model_name=meta["model"], fingerprint=meta["fingerprint"],
                   meta={k: v for k, v in meta.items() if k not in known})
        with torch.no_grad():
            lens.weight.copy_(tensors["weight"])
            lens.bias.copy_(tensors["bias"])
        if model is not None:
            lens.check_model(model)
        return lens
