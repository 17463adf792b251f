"""SNMF features as directions: what a feature writes to the residual stream, and steering with it.

A feature z (a column of Z, over the MLP's hidden neurons) enters the model through the MLP's
down projection: its output direction at ``blocks.L.hook_mlp_out`` is W_down·z. Three ways to
steer with it, each an ordinary ``interp.intervene`` intervention:

- ``"mlp_out"``: ``Add`` the unit output direction W_down·z / ‖W_down·z‖ at ``hook_mlp_out``;
- ``"mlp_post"``: ``Add`` the unit feature z / ‖z‖ at ``mlp.hook_post`` (the paper's intervention;
  the same direction after the down projection, with another unit of strength);
- ``"scale_neurons"``: ``Apply`` a factor to the feature's neurons at ``mlp.hook_post`` (1 keeps
  them, 0 silences them, 4 quadruples them), acting only where those neurons are active.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from interp.errors import InputError
from interp.intervene import Add, Apply, Intervention, Positions

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.snmf.factors import SNMF

HOW = ("mlp_out", "mlp_post", "scale_neurons")


def down_projection(model: Model, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """h [..., d_mlp] -> W_down·h [..., d_model]: block ``layer``'s MLP output projection without its bias."""
    if model.cfg.backend == "transformer_lens":
        W_out = model.module.blocks[layer].mlp.W_out  # [d_mlp, d_model]
        return lambda h: h.to(W_out) @ W_out
    arch = getattr(model, "arch", None)
    if arch is None:
        raise InputError(f"{type(model).__name__} does not say where its MLP output projection is")
    proj = model.module.get_submodule(f"{arch.layers}.{layer}.{arch.mlp_out_proj}")
    param = next(proj.parameters())
    with torch.no_grad():
        bias = proj(torch.zeros(1, model.cfg.d_mlp, dtype=param.dtype, device=param.device))
    return lambda h: proj(h.to(param)) - bias  # a linear map (nn.Linear or GPT-2's Conv1D) minus its bias


def _layer(snmf: SNMF, model: Model) -> int:
    layer = snmf.layer
    if layer is None:
        raise InputError("this SNMF was not fitted on a model site (blocks.L.mlp.hook_post); it has no layer to steer at")
    if snmf.d != model.cfg.d_mlp:
        raise InputError(f"this SNMF factors width {snmf.d}, but {model.cfg.name} has d_mlp {model.cfg.d_mlp}")
    return layer


@torch.no_grad()
def output_directions(snmf: SNMF, model: Model) -> torch.Tensor:
    """W_down·z for every feature: [k, d_model], float32 on the CPU (not normalised)."""
    layer = _layer(snmf, model)
    return down_projection(model, layer)(snmf.Z.T).float().cpu()


def steering_vector(snmf: SNMF, model: Model, feature: int, *, how: str = "mlp_out") -> tuple[str, torch.Tensor]:
    """(site, unit vector) to ``Add`` for feature ``feature``: its output direction at
    ``hook_mlp_out`` (``how="mlp_out"``) or its neuron pattern at ``mlp.hook_post`` (``"mlp_post"``)."""
    layer = _layer(snmf, model)
    z = snmf.Z[:, snmf._check(feature)].float()
    if how == "mlp_out":
        vector = output_directions(snmf, model)[feature]
        site = model.site("mlp_out", layer)
    elif how == "mlp_post":
        vector, site = z, model.site("mlp_post", layer)
    else:
        raise InputError(f"how={how!r}: a steering vector is added at 'mlp_out' or 'mlp_post'")
    norm = float(vector.norm())
    if norm == 0:
        raise InputError(f"feature {feature} is dead (all its weights are zero): it has no direction")
    return site, vector / norm


def steer(snmf: SNMF, model: Model, feature: int, scale: float, *, how: str = "mlp_out",
          positions: Positions = None) -> Intervention:
    """An intervention for feature ``feature`` (see the module docstring for ``how``).

    For ``"mlp_out"`` / ``"mlp_post"``, ``scale`` multiplies the unit vector; for
    ``"scale_neurons"`` it is the factor applied to the feature's neurons.
    """
    if how not in HOW:
        raise InputError(f"how={how!r}: choose one of {', '.join(HOW)}")
    if how == "scale_neurons":
        layer = _layer(snmf, model)
        neurons = torch.tensor([i for i, _ in snmf.neurons(feature)], dtype=torch.long)
        factor = torch.ones(snmf.d)
        factor[neurons] = scale

        def scale_neurons(act: torch.Tensor) -> torch.Tensor:
            return act * factor.to(act)

        return Apply(model.site("mlp_post", layer), scale_neurons, positions=positions)
    site, vector = steering_vector(snmf, model, feature, how=how)
    return Add(site, vector, scale=scale, positions=positions)
