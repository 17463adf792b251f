"""The one intervention mechanism: edit a site's activation during a forward pass.

Patching, steering, LinEAS maps, ablations, CAFT and spliced dictionaries are all built from these::

    with model.intervene(Add("blocks.6.hook_resid_post", direction, scale=8.0)):
        model.generate("I think that")

Each intervention edits the whole activation out of place; ``positions`` and ``heads`` then
select where the edit is kept. ``positions`` are absolute token positions: during generation
with a KV cache the model sees one new token per step, and position ``p`` means the p-th token
of the sequence, whichever step computes it; negative positions count from the end of the
tokens of the current forward pass (so ``-1`` is every newly generated token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from interp.errors import InputError

if TYPE_CHECKING:
    from interp.models.model import Model
    from interp.models.sites import SiteInfo

Positions = int | Sequence[int] | slice | torch.Tensor | None
Heads = int | Sequence[int] | None


@dataclass
class Intervention:
    """Base class: ``site`` plus optional ``positions`` / ``heads`` restricting the edit."""

    site: str
    _: KW_ONLY
    positions: Positions = None
    heads: Heads = None

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        """The edited activation (whole tensor; the region selection happens outside)."""
        raise NotImplementedError


@dataclass
class Add(Intervention):
    """Add ``scale * vector`` (broadcast over the leading dims)."""

    vector: torch.Tensor
    scale: float = 1.0

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        return act + self.scale * self.vector.to(act)


@dataclass
class Affine(Intervention):
    """Per-unit affine map ``act * weight + bias`` over the last dimension (LinEAS, Mean-/Linear-AcT)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        return act * self.weight.to(act) + self.bias.to(act)


@dataclass
class Replace(Intervention):
    """Replace by ``value``: a tensor broadcastable to the activation, or a number."""

    value: torch.Tensor | float

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(self.value).to(act)
        return value.expand_as(act) if value.shape != act.shape else value


@dataclass
class Ablate(Intervention):
    """Zero ablation, or mean ablation with a given mean (default: the mean over batch and positions)."""

    how: Literal["zero", "mean"] = "zero"
    mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.how not in ("zero", "mean"):
            raise InputError(f"Ablate(how={self.how!r}): choose 'zero' or 'mean'")

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        if self.how == "zero":
            return torch.zeros_like(act)
        mean = self.mean.to(act) if self.mean is not None else act.mean(dim=(0, 1), keepdim=True)
        return mean.expand_as(act)


@dataclass
class Clamp(Intervention):
    """Set unit(s) of the last dimension (neurons, latents) to ``value``."""

    unit: int | Sequence[int]
    value: float

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[..., torch.as_tensor(self.unit, dtype=torch.long, device=act.device)] = self.value
        return out


@dataclass
class ProjectOut(Intervention):
    """Remove the component in the span of ``directions`` ([k, d] or [d]) from the last dim."""

    directions: torch.Tensor
    basis: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        directions = torch.as_tensor(self.directions, dtype=torch.float32)
        directions = directions.reshape(-1, directions.shape[-1])
        self.basis = torch.linalg.qr(directions.T).Q  # [d, k], orthonormal columns

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        basis = self.basis.to(act)
        return act - (act @ basis) @ basis.T


@dataclass
class Apply(Intervention):
    """Call ``fn(activation) -> activation`` (same shape; it must not modify its input in place)."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    def edit(self, act: torch.Tensor) -> torch.Tensor:
        out = self.fn(act)
        if not isinstance(out, torch.Tensor) or out.shape != act.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"Apply at {self.site}: fn returned {got}, expected shape {tuple(act.shape)}")
        return out


class _Offset:
    """Tokens already processed in earlier steps of this sequence (KV-cache generation)."""

    value = 0


@contextlib.contextmanager
def intervening(model: Model, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Attach ``interventions`` to ``model`` for the duration of the block (see ``Model.intervene``)."""
    resolved = [(iv, model.site_table.info(iv.site)) for iv in interventions]  # validate first
    for iv, info in resolved:
        if iv.heads is not None and info.head_dim is None:
            raise InputError(f"{type(iv).__name__} at {iv.site}: this site has no head dimension")
    offset = _Offset()
    handles = []
    model.active_interventions += len(interventions)
    try:
        if any(iv.positions is not None for iv in interventions):

            def track(_module: object, args: tuple, kwargs: dict) -> None:
                offset.value = model.cache_offset(args, kwargs)

            handles.append(model.module.register_forward_pre_hook(track, with_kwargs=True))
        for iv, info in resolved:
            handles.append(model.site_table.hook(iv.site).attach(_edit_fn(iv, info, offset)))
        yield
    finally:
        model.active_interventions -= len(interventions)
        for handle in handles:
            handle.remove()


def _edit_fn(iv: Intervention, info: SiteInfo, offset: _Offset) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(act: torch.Tensor) -> torch.Tensor:
        new = iv.edit(act)
        keep = region_mask(act, info, iv.positions, iv.heads, offset.value)
        return new if keep is None else torch.where(keep, new, act)

    return fn


def region_mask(
    act: torch.Tensor, info: SiteInfo, positions: Positions, heads: Heads, offset: int = 0
) -> torch.Tensor | None:
    """Boolean mask broadcastable to ``act``: True where an edit applies (None: everywhere)."""
    mask: torch.Tensor | None = None
    shape = [1] * act.ndim
    if positions is not None:
        if info.pos_dim is None:
            raise InputError(f"{info.name} has no position dimension")
        seq = act.shape[info.pos_dim]
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
            if positions.ndim != 2:
                raise InputError("a boolean positions mask must be [batch, pos]")
            local = positions[:, offset : offset + seq].to(act.device)
            pos_shape = [1] * act.ndim
            pos_shape[0], pos_shape[info.pos_dim] = local.shape
            mask = local.reshape(pos_shape)
        else:
            keep = torch.zeros(seq, dtype=torch.bool, device=act.device)
            keep[_local_positions(positions, seq, offset)] = True
            pos_shape = list(shape)
            pos_shape[info.pos_dim] = seq
            mask = keep.reshape(pos_shape)
    if heads is not None:
        assert info.head_dim is not None
        keep = torch.zeros(act.shape[info.head_dim], dtype=torch.bool, device=act.device)
        keep[torch.as_tensor(heads, dtype=torch.long)] = True
        head_shape = list(shape)
        head_shape[info.head_dim] = keep.numel()
        head_mask = keep.reshape(head_shape)
        mask = head_mask if mask is None else mask & head_mask
    return mask


def _local_positions(positions: Positions, seq: int, offset: int) -> list[int]:
    """Absolute positions -> indices into this forward pass's ``seq`` tokens (out-of-range dropped)."""
    if isinstance(positions, slice):
        wanted = range(offset + seq)[positions]
    else:
        wanted = [int(p) for p in torch.as_tensor(positions).flatten().tolist()]
    local = []
    for p in wanted:
        index = seq + p if p < 0 else p - offset
        if 0 <= index < seq:
            local.append(index)
    return local
