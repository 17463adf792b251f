"""``run_with_cache`` and ``ActivationCache``: one forward pass, the activations you asked for.

The run stops right after the deepest requested site (``stop_at_layer="auto"``), so caching
layer 6 of 30 costs about a fifth of a full forward. Values are the ones the model computed,
after any active interventions at that site, stored in the dtype and on the device asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch

from interp.models.hooks import StopForward
from interp.errors import InputError, UnknownSiteError

if TYPE_CHECKING:
    from interp.intervene import Intervention
    from interp.models.model import Model, SiteSpec, TokenInput, Tokens


def run_with_cache(
    model: Model,
    inputs: TokenInput,
    sites: SiteSpec = None,
    *,
    stop_at_layer: int | Literal["auto"] | None = "auto",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    interventions: Sequence[Intervention] = (),
    prepend_bos: bool | None = None,
) -> ActivationCache:
    """Run ``model`` on ``inputs`` and return the activations at ``sites``.

    sites: a name, a glob (``"blocks.*.hook_resid_post"``), a list, a predicate, or None (all).
    stop_at_layer: ``"auto"`` stops after the deepest requested site (no logits); ``None``
        runs the whole model and keeps the logits; an int ``L`` runs blocks ``0..L-1`` only
        (TransformerLens's convention) and refuses sites beyond them.
    dtype, device: where to keep the cached tensors (default: as computed).
    interventions: active during this run; cached values are taken after them.
    """
    names = model.site_names(sites)
    table = model.site_table
    stop_site = _stop_site(model, names, stop_at_layer)
    tokens = model.tokenize(inputs, prepend_bos=prepend_bos)
    acts: dict[str, torch.Tensor] = {}

    def capture(name: str, copy: bool):
        def fn(value: torch.Tensor) -> None:
            detached = value.detach()
            kept = detached.to(device=device, dtype=dtype)
            acts[name] = kept.clone() if copy and kept is detached else kept

        return fn

    def stop(_value: torch.Tensor) -> None:
        raise StopForward

    logits = None
    with model.intervene(*interventions), torch.no_grad():
        handles = [table.hook(name).attach(capture(name, table.hook(name).mutable)) for name in names]
        if stop_site is not None:
            handles.append(table.hook(stop_site).attach(stop))
        try:
            logits = model._logits(tokens)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
    return ActivationCache(acts, tokens=tokens, logits=logits, model=model)


def _stop_site(model: Model, names: list[str], stop_at_layer: int | str | None) -> str | None:
    table = model.site_table
    if stop_at_layer is None:
        return None
    if stop_at_layer == "auto":
        return max(names, key=lambda n: table.info(n).depth) if names else None
    if not isinstance(stop_at_layer, int) or not 0 <= stop_at_layer <= model.cfg.n_layers:
        raise InputError(f"stop_at_layer={stop_at_layer!r}: use 'auto', None or 0..{model.cfg.n_layers}")
    beyond = [n for n in names if table.info(n).depth >= (stop_at_layer, 0)]
    if beyond:
        raise InputError(
            f"stop_at_layer={stop_at_layer} runs blocks 0..{stop_at_layer - 1}, but these sites lie "
            f"beyond: {', '.join(beyond[:5])}"
        )
    return "hook_embed" if stop_at_layer == 0 else model.site("resid_post", stop_at_layer - 1)


class ActivationCache(Mapping[str, torch.Tensor]):
    """Activations by site name, plus the tokens they came from.

    Index by full name (``cache["blocks.3.hook_resid_post"]``) or, as in TransformerLens, by
    ``(kind, layer)``: ``cache["resid_post", 3]``.
    """

    def __init__(self, acts: dict[str, torch.Tensor], *, tokens: Tokens, logits: torch.Tensor | None, model: Model):
        self._acts = acts
        self.tokens = tokens.ids
        self.attention_mask = tokens.mask
        self.logits = logits
        self.model = model

    def _name(self, key: str | tuple[str, int]) -> str:
        return self.model.site(*key) if isinstance(key, tuple) else key

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        name = self._name(key)
        if name in self._acts:
            return self._acts[name]
        self.model.site_table.check(name)  # an unknown site name gets the closest-names error
        raise UnknownSiteError(
            f"{name!r} is a site of {self.model.cfg.name} but was not cached; cached sites: "
            f"{', '.join(list(self._acts)[:8])}{' ...' if len(self._acts) > 8 else ''}"
        )

    def __contains__(self, key: object) -> bool:
        try:
            return self._name(key) in self._acts  # type: ignore[arg-type]
        except (UnknownSiteError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites, tokens={tuple(self.tokens.shape)})"

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ActivationCache:
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self._acts.items()}
        out = ActivationCache.__new__(ActivationCache)
        out.__dict__.update(self.__dict__, _acts=moved)
        return out

    def stack(self, kind: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """One site kind across layers: [n_layers, *site_shape]."""
        layers = range(self.model.cfg.n_layers) if layers is None else layers
        return torch.stack([self[kind, layer] for layer in layers])

    def accumulated_resid(
        self, layer: int | None = None, *, incl_mid: bool = False, apply_ln: bool = False, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream at the start of each block up to ``layer`` (exclusive), stacked.

        With ``layer=None`` the final residual (after the last block) is appended. Labels follow
        TransformerLens: ``"3_pre"``, ``"3_mid"``, ``"final_post"``. ``apply_ln`` passes each
        through the model's final norm, as the logit lens does.
        """
        n_layers = self.model.cfg.n_layers
        stop = n_layers if layer is None else layer
        parts: list[torch.Tensor] = []
        labels: list[str] = []
        for index in range(stop):
            parts.append(self["resid_pre", index])
            labels.append(f"{index}_pre")
            if incl_mid:
                parts.append(self["resid_mid", index])
                labels.append(f"{index}_mid")
        if layer is None:
            parts.append(self["resid_post", n_layers - 1])
            labels.append("final_post")
        stacked = torch.stack(parts)
        if apply_ln:
            stacked = self.apply_final_norm(stacked)
        return (stacked, labels) if return_labels else stacked

    def apply_final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's final norm applied to each residual vector (recomputing its scale)."""
        norm = self.model.final_norm
        weight = next(norm.parameters(), None)
        with torch.no_grad():
            return norm(resid.to(weight.dtype if weight is not None else resid.dtype))
