"""Steering vectors: where they come from, how strong they are, how they are saved.

Sources (each returns a ``SteeringVector``: a site and a vector in that site's coordinates):

- ``diff_in_means``: mean activation of the concept's positive texts minus that of its negative
  texts (last token, or mean over tokens); for a file of contrastive pairs, the mean over pairs
  of (positive - negative), ActAdd-style;
- ``probe_vector``: a probe's weight direction (``interp.probes``);
- ``latent_vector``: an SAE or transcoder latent's decoder row (``concept_latents`` ranks the
  latents of a dictionary by how much more they fire on the concept's positive texts);
- ``SteeringVector(site, tensor)``: any given tensor.

Strength: ``vector.scaled(strength, units)`` is the vector to add. Directions are used at unit
norm, so ``units="absolute"`` adds a vector of norm ``strength``, and ``units="norm"`` one of
``strength`` times the site's mean activation norm (``site_mean_norm``): the same strength
means the same push whichever source the direction came from.

Difference from the original ActAdd: there, the per-token difference of one prompt pair is
added to the first tokens of the prompt. Here a pair contributes one vector (the difference at
its last token, or of its token means), applied like every other vector, at any positions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from interp.data.concepts import Concept
from interp.errors import InputError
from interp.paths import atomic_write, write_json
from interp.probes import Probe, Reduce, concept_activations

if TYPE_CHECKING:
    from interp.dictionary import SparseDictionary
    from interp.models.model import Model

UNITS = ("norm", "absolute")
Units = Literal["norm", "absolute"]


@dataclass
class SteeringVector:
    """A direction at ``site``; ``vector`` keeps its natural norm, ``direction`` is unit length."""

    site: str
    vector: torch.Tensor  # [d]
    source: str = "tensor"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vector = torch.as_tensor(self.vector).detach().float().cpu()
        if self.vector.ndim != 1:
            raise InputError(f"a steering vector is one [d] tensor (got shape {tuple(self.vector.shape)})")
        if not torch.isfinite(self.vector).all() or self.vector.norm() == 0:
            raise InputError(f"the {self.source} vector at {self.site} is zero or not finite; it gives no direction")

    @property
    def direction(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def scaled(self, strength: float, units: Units = "norm", mean_norm: float | None = None) -> torch.Tensor:
        """The vector to add: ``strength`` x the unit direction, times ``mean_norm`` for ``units="norm"``."""
        strength = check_strength(strength)
        if units not in UNITS:
            raise InputError(f"units={units!r}: choose one of {', '.join(UNITS)}")
        if units == "absolute":
            return strength * self.direction
        if mean_norm is None or not math.isfinite(mean_norm) or mean_norm <= 0:
            raise InputError("units='norm' needs the site's mean activation norm (site_mean_norm), a positive number")
        return strength * mean_norm * self.direction

    def save(self, path: str | Path) -> Path:
        """``path`` (safetensors, the vector) and ``<path>.json`` (site, source, info)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"vector": self.vector.contiguous()}, str(tmp)))
        meta = {"site": self.site, "source": self.source, "info": self.info}
        write_json(path.with_suffix(".json"), meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a vector written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such steering-vector file")
        try:
            vector = load_file(str(path))["vector"]
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"{path} is not a steering vector written by SteeringVector.save ({err})") from None
        return cls(meta["site"], vector, meta.get("source", "tensor"), meta.get("info", {}))


def check_strength(strength: float) -> float:
    value = float(strength)
    if not math.isfinite(value):
        raise InputError(f"strength {strength!r} is not a finite number")
    return value


def diff_in_means(model: Model, concept: Concept, site: str, *, reduce: Reduce = "last", batch_size: int = 32) -> SteeringVector:
    """Mean activation of the positive texts minus the negative ones (per pair for contrastive pairs)."""
    concept.check()
    site = model.site_table.check(site)
    acts = concept_activations(model, concept.texts, [site], reduce=reduce, batch_size=batch_size)[site]
    labels = torch.tensor(concept.labels)
    if concept.pairs is not None:  # texts are all positives then all negatives, in pair order
        n = len(concept.pairs)
        vector = (acts[:n] - acts[n:]).mean(0)
        source = "pairs"
    else:
        vector = acts[labels == 1].mean(0) - acts[labels == 0].mean(0)
        source = "diff-means"
    n_pos, n_neg = concept.counts()
    info = {"concept": concept.name, "reduce": reduce, "n_positive": n_pos, "n_negative": n_neg, "norm": float(vector.norm())}
    return SteeringVector(site, vector, source, info)


def probe_vector(probe: Probe) -> SteeringVector:
    """A probe's weight direction (towards the concept)."""
    return SteeringVector(probe.site, probe.weight, f"probe-{probe.method}", {"reduce": probe.reduce, **probe.metrics})


def latent_vector(dictionary: SparseDictionary, latent: int, *, name: str = "") -> SteeringVector:
    """The decoder row of ``latent``, at the site the dictionary writes (an SAE's own site, a transcoder's output)."""
    c = dictionary.config
    if not 0 <= latent < c.n_latents:
        raise InputError(f"latent {latent} out of range 0..{c.n_latents - 1}")
    site = c.output_site if c.is_transcoder else c.input_site
    if not site:
        raise InputError("the dictionary does not record its site; give the vector's site explicitly")
    return SteeringVector(site, dictionary.W_dec[latent].detach(), "sae-latent",
                          {"latent": latent, "dictionary": name, "architecture": c.architecture, "n_latents": c.n_latents})


def concept_latents(model: Model, dictionary: SparseDictionary, concept: Concept, *, reduce: Reduce = "mean",
                    by: Literal["effect", "difference"] = "effect", top: int = 10, batch_size: int = 32) -> pd.DataFrame:
    """Latents of ``dictionary`` that fire more on the concept's positive texts than on its negative ones.

    Latent activations are taken per token and then reduced like ``concept_activations`` (so
    ``"mean"`` is the mean latent activation over each text's tokens, first token left out).
    Ranked ``by`` the effect size (the difference of the class means over their pooled standard
    deviation, default) or the raw difference; the raw difference favours dense latents that fire
    strongly on nearly every text. Columns: latent, mean_positive, mean_negative, difference,
    effect_size, fires_positive, fires_negative (share of texts where the reduced activation is > 0).
    """
    if by not in ("effect", "difference"):
        raise InputError(f"by={by!r}: choose effect or difference")
    concept.check()
    c = dictionary.config
    site = model.site_table.check(c.input_site)
    d = dictionary.W_enc.shape[1]

    def latents(act: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return dictionary.encode(act.reshape(-1, d)).to_dense(c.n_latents).reshape(*act.shape[:-1], c.n_latents)

    acts = concept_activations(model, concept.texts, [site], reduce=reduce, batch_size=batch_size, transform=latents)[site]
    labels = torch.tensor(concept.labels)
    pos, neg = acts[labels == 1], acts[labels == 0]
    diff = pos.mean(0) - neg.mean(0)
    effect = diff / ((pos.var(0) + neg.var(0)) / 2).sqrt().clamp_min(1e-6)
    order = (effect if by == "effect" else diff).argsort(descending=True)[:top]
    return pd.DataFrame({
        "latent": order.numpy(), "mean_positive": pos.mean(0)[order].numpy(), "mean_negative": neg.mean(0)[order].numpy(),
        "difference": diff[order].numpy(), "effect_size": effect[order].numpy(),
        "fires_positive": (pos[:, order] > 0).float().mean(0).numpy(), "fires_negative": (neg[:, order] > 0).float().mean(0).numpy(),
    })


def site_mean_norm(model: Model, site: str, texts: Sequence[str], *, batch_size: int = 32) -> float:
    """Mean L2 norm of ``site``'s activation over the tokens of ``texts``, each text's first token left out
    (it carries massive activations in many models)."""
    site = model.site_table.check(site)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(list(texts[start : start + batch_size]), padding_side="right")
        act = model.run_with_cache(tokens, [site], dtype=torch.float32, device="cpu")[site]
        keep = tokens.real().cpu().clone()
        if keep.shape[1] > 1:
            keep[:, 0] = False
        total += float(act.norm(dim=-1)[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise InputError("no tokens to measure the mean activation norm on")
    return total / count
